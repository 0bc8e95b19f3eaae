"""Offline preference optimisation: DPO and its family, one driver, the loss chosen by name.

    python -m align algo=dpo                       # DPO (sigmoid) on HH-RLHF pairs
    python -m align algo=dpo algo.loss=ipo         # or robust, hinge, simpo, orpo
    python -m align algo=kto                       # KTO, each HH pair split into two examples

Every loss comes from `align.core.PREFERENCE_LOSSES` (docs/paper_index.md cites each). One
optimizer step:

1. takes `grad_accum` micro-batches of B pairs and gets the summed response log-probs
   log pi(y|x) of both sides: each prompt runs once, then the 2B chosen and rejected responses
   in one forward over its cached keys and values (`align/trainers/logps.py`; with
   `algo.share_prompt=false`, one forward over 2B prompt + response rows);
2. reads the reference log-probs log pi_ref(y|x), precomputed before training for exactly the
   items the run's `max_steps` will visit and the held-out ones (adapters off with LoRA, the
   initial weights with full fine-tuning; cached on disk, see `align/trainers/reference.py`) or
   computed per batch; reference-free losses skip them;
3. calls the loss, scaled to its share of the step, so the step's loss is the mean over all of
   its pairs (and ORPO's NLL the mean over all of its chosen tokens): 2 x 4 accumulation gives
   the gradient of 1 x 8;
4. clips, steps, logs implicit rewards, margins, accuracy and log-probs, evaluates on held-out
   pairs (at step 0 and every `eval_every`) and checkpoints for exact resume.

KTO is unpaired: its micro-batches hold B (prompt, completion, label) examples, and before the
micro-batches of a step its reference point z0 is estimated, without gradient, from the same
examples' prompts paired with other examples' completions (fixed per example, see
`assign_mismatched`).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config import DataConfig, DPOConfig, RunConfig
from align.core import PREFERENCE_LOSSES, REFERENCE_FREE_LOSSES, kto_reference_point, masked_mean
from align.engine import TrainEngine, distributed
from align.lifecycle import save_or_stop
from align.trainers.checkpoint import Checkpointer
from align.trainers.common import (
    EpochBatches,
    build_optimizer,
    build_scheduler,
    prepare_output_dir,
    replica_micro_batches,
    save_final,
    seed_everything,
    set_threads,
)
from align.trainers.logps import (
    collate_sequences,
    collate_shared,
    concatenated_logps,
    response_logps,
    shared_prompt_cost,
    shared_prompt_logps,
)
from align.trainers.metrics import run_logger
from align.trainers.reference import default_cache_dir, reference_logps, reference_mode
from align.trainers.setup import build_policy, model_device, on_meta

# The loss functions' statistics, under the names the logs use.
STAT_NAMES = {"chosen_rewards": "rewards/chosen", "rejected_rewards": "rewards/rejected",
              "margins": "rewards/margins", "accuracy": "rewards/accuracy"}
# Losses with a term averaged over the chosen *tokens* of their batch (ORPO's NLL), which the
# step re-weights so that it is averaged over the tokens of the whole step.
TOKEN_MEAN_NLL = frozenset({"orpo"})


# ---------------------------------------------------------------------------------------- data


def unpair(pairs: list[dict]) -> list[dict]:
    """KTO from preference pairs, the conversion of the KTO paper's HH experiments
    (Ethayarajh et al. 2024, Sec. 4.2): each pair gives a desirable example (prompt, chosen)
    and an undesirable one (prompt, rejected), both with the pair's prompt tokens."""
    return [{"prompt_ids": p["prompt_ids"], "completion_ids": p[key], "label": label}
            for p in pairs for key, label in (("chosen_ids", True), ("rejected_ids", False))]


def assign_mismatched(items: list[dict], max_length: int, seed: int) -> None:
    """Give each unpaired item the completion of another prompt (`kl_completion_ids`).

    KTO's reference point z0 = max(0, E[log pi(y'|x) / pi_ref(y'|x)]) is estimated on
    mismatched pairs (x, y'), y' answering another prompt (Ethayarajh et al. 2024, Sec. 4.2:
    shift the outputs by one within the batch). Here the shift is fixed once per example: under
    a seeded permutation, item perm[k] takes the completion of the next item with a different
    prompt. Fixed pairs let the reference's log-probs of them be precomputed with the rest.
    The completion is cut so that prompt + completion fits `max_length`.
    """
    n = len(items)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    for k, i in enumerate(perm):
        j = next((perm[(k + s) % n] for s in range(1, n)
                  if items[perm[(k + s) % n]]["prompt_ids"] != items[i]["prompt_ids"]), perm[(k + 1) % n])
        room = max(max_length - len(items[i]["prompt_ids"]), 1)
        items[i]["kl_completion_ids"] = items[j]["completion_ids"][:room]


@dataclass
class PreferenceData:
    """Tokenized items. Pairs: {prompt_ids, chosen_ids, rejected_ids}; unpaired:
    {prompt_ids, completion_ids, label, kl_completion_ids}. Validation stays paired when the
    source is paired (held-out pair accuracy), also for KTO."""

    train: list[dict]
    val: list[dict]
    stats: dict
    stats_line: str


def load_preference_data(cfg: DataConfig, algo: DPOConfig, tokenizer, seed: int) -> PreferenceData:
    """Read, split deterministically and tokenize `cfg.source` for `algo.loss`."""
    from align.data import DataStats, KTOExample, build_split, tokenize_kto, tokenize_pairs

    stats = DataStats()
    train, val = build_split(
        cfg.source, cfg.format, val_fraction=cfg.val_fraction, val_size=cfg.val_size, seed=cfg.seed,
        columns=dict(cfg.columns), on_error=cfg.on_error, limit=cfg.limit, split=cfg.split, stats=stats,
    )
    paired = not any(isinstance(x, KTOExample) for x in train + val)
    kto = algo.loss == "kto"
    if kto and paired and not algo.unpair:
        raise ValueError("algo.loss=kto needs unpaired data (data.format=kto), or algo.unpair=true to split "
                         f"each {cfg.format!r} pair into a desirable and an undesirable example")
    if not kto and not paired:
        raise ValueError(f"algo.loss={algo.loss!r} needs preference pairs; data.format={cfg.format!r} is unpaired")
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
              max_response_length=cfg.max_response_length, overlong=cfg.overlong, stats=stats)
    tokenize = tokenize_pairs if paired else tokenize_kto
    train_items, val_items = tokenize(train, tokenizer, **kw), tokenize(val, tokenizer, **kw)
    if kto:
        train_items = unpair(train_items) if paired else train_items
        for items in [train_items] if paired else [train_items, val_items]:
            assign_mismatched(items, cfg.max_length, seed)
    if not train_items:
        raise ValueError(f"data.source {cfg.source}: no training examples left; {stats.summary()}")
    return PreferenceData(train_items, val_items, stats.as_dict(), stats.summary())


def item_sequences(item: dict) -> list[tuple[list[int], list[int]]]:
    """The (prompt, response) sequences of one item whose log-probs a loss needs."""
    if "chosen_ids" in item:
        return [(item["prompt_ids"], item["chosen_ids"]), (item["prompt_ids"], item["rejected_ids"])]
    return [(item["prompt_ids"], item["completion_ids"]), (item["prompt_ids"], item["kl_completion_ids"])]


def visited_items(order: EpochBatches, micro_batches: int) -> list[int]:
    """The training items that `micro_batches` batches of `order` visit, each once, in the order
    of their first visit: the run's deterministic batch order replayed from step 1 (on resume
    too, so a resumed run asks for the same references as the first: the same cache entry, the
    same numbers)."""
    replay = copy.deepcopy(order)
    replay.load_state_dict({"epoch": 0, "cursor": 0})
    seen: dict[int, None] = {}
    for _ in range(micro_batches):
        if len(seen) == order.n:
            break
        seen.update(dict.fromkeys(replay.next()))
    return list(seen)


def precompute_reference(model, objective: "PreferenceObjective", groups: list[list[dict]], cfg: RunConfig,
                         tokenizer) -> bool:
    """Store the reference log-probs of every item's sequences in the item (`ref`: a pair
    (chosen, rejected) or (completion, mismatched)); returns whether the disk cache had them.

    Each group (training, held-out) is run in the chunks of `algo.reference_batch_size` items
    that `evaluate` uses, through the same forward, so at step 0 the policy's held-out
    log-probs equal the reference's exactly (implicit rewards 0, not rounding noise). A pass
    over more than a few chunks shows a progress bar (`trainer.progress`).
    """
    from tqdm.auto import tqdm

    algo, device = cfg.algo, next(model.parameters()).device
    size, pad = algo.reference_batch_size, tokenizer.pad_token_id
    items = [x for group in groups for x in group]

    def compute(m):
        # Replica r runs chunks r, r + N, ... of each group; one that runs out repeats the group's
        # first chunk (and drops it), so every replica runs the same forwards (ddp, fsdp2: KTO's
        # held-out pairs and training examples take different passes). Then the parts are summed.
        rank, world = distributed.rank(), distributed.world_size()
        out, offset, runs = torch.zeros(2 * len(items)), 0, []  # two sequences per item
        for g in groups:
            chunks = [g[i : i + size] for i in range(0, len(g), size)]
            starts = [offset + 2 * i for i in range(0, len(g), size)]
            offset += 2 * len(g)
            for j in range(-(-len(chunks) // world)):
                i = rank + j * world
                runs.append((chunks[i], starts[i]) if i < len(chunks) else (chunks[0], None))
        with tqdm(total=len(items), desc="reference log-probs", unit="item", file=sys.stderr, dynamic_ncols=True,
                  disable=not cfg.trainer.progress or len(runs) <= 4 or not distributed.is_main()) as bar:
            for chunk, start in runs:
                logps = objective.logps(m, collate(chunk, pad, device))[0]
                if start is not None:
                    out[start : start + len(logps)] = logps.float().cpu()
                bar.update(len(chunk) * world)
        return distributed.all_sum_tensor(out)

    layout = f"share_prompt={algo.share_prompt} chunks={size} groups={[len(g) for g in groups]}"
    if objective.packed:  # other passes, other rounding: a cache entry of its own
        layout += " packed"
    cache_dir = (algo.reference_cache_dir or default_cache_dir()) if algo.reference_cache else None
    logps, hit = reference_logps(model, [s for x in items for s in item_sequences(x)], compute, model_cfg=cfg.model,
                                 tokenizer=tokenizer, cache_dir=cache_dir, layout=layout,
                                 description=f"{cfg.data.source} ({len(items)} items)")
    for item, pair in zip(items, logps.view(-1, 2).tolist()):
        item["ref"] = pair
    return hit


# ------------------------------------------------------------------------------------- batches


@dataclass
class PairBatch:
    """B preference pairs, each prompt stored once.

    prompt_ids, prompt_mask: (B, P), right-padded.
    response_ids, response_mask: (2B, R), right-padded; row 2b is pair b's chosen response,
        row 2b + 1 its rejected one.
    ref_logps: (2B,) reference log-probs in the same row order, or None (not precomputed).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ref_logps: torch.Tensor | None

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"prompt_ids": self.prompt_ids, "prompt_mask": self.prompt_mask,
                "response_ids": self.response_ids, "response_mask": self.response_mask}

    @property
    def chosen_tokens(self) -> float:
        return float(self.response_mask[0::2].sum())


@dataclass
class UnpairedBatch:
    """B unpaired (KTO) examples, and the same prompts with mismatched completions.

    input_ids, attention_mask, loss_mask: (B, T), right-padded; loss_mask 1 on completion tokens.
    desirable: (B,) bool.
    kl_input_ids, kl_attention_mask, kl_loss_mask: (B, T') prompt i + another prompt's completion.
    ref_logps: (2B,) reference log-probs, row 2i example i, row 2i + 1 its mismatched twin; or None.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    desirable: torch.Tensor
    kl_input_ids: torch.Tensor
    kl_attention_mask: torch.Tensor
    kl_loss_mask: torch.Tensor
    ref_logps: torch.Tensor | None


def collate(items: list[dict], pad_id: int, device: torch.device) -> PairBatch | UnpairedBatch:
    """Pad a list of items into the batch type of their kind, on `device`. Reference log-probs
    (when the items carry them) come out (2B,) in `item_sequences` order."""
    ref = None
    if "ref" in items[0]:
        ref = torch.tensor([x["ref"] for x in items], dtype=torch.float32).reshape(-1).to(device)  # (2B,)

    def on_device(tensors: dict) -> dict:
        return {k: v.to(device) for k, v in tensors.items()}

    if "chosen_ids" in items[0]:
        responses = [r for x in items for r in (x["chosen_ids"], x["rejected_ids"])]
        shared = collate_shared([x["prompt_ids"] for x in items], responses, pad_id)
        return PairBatch(**on_device(shared), ref_logps=ref)
    seqs = [item_sequences(x) for x in items]
    main = on_device(collate_sequences([s[0] for s in seqs], pad_id))
    kl = on_device(collate_sequences([s[1] for s in seqs], pad_id))
    return UnpairedBatch(**main, desirable=torch.tensor([bool(x["label"]) for x in items], device=device),
                         kl_input_ids=kl["input_ids"], kl_attention_mask=kl["attention_mask"],
                         kl_loss_mask=kl["loss_mask"], ref_logps=ref)


class OnlineReference:
    """Reference log-probs per batch (precompute_reference=false): the policy with its adapters
    off (LoRA), or a frozen copy of the initial weights (full fine-tuning)."""

    def __init__(self, policy: torch.nn.Module, lora: bool):
        self.model = policy if lora else copy.deepcopy(policy).requires_grad_(False)

    def __call__(self, logps_fn, batch) -> torch.Tensor:
        with reference_mode(self.model):
            return logps_fn(self.model, batch)[0]


# ---------------------------------------------------------------------------------- the losses


def loss_options(algo: DPOConfig, loss_fn) -> dict:
    """The config's loss-specific keywords that `loss_fn` accepts (gamma for SimPO, ...)."""
    options = {"label_smoothing": algo.label_smoothing, "gamma": algo.simpo_gamma,
               "desirable_weight": algo.desirable_weight, "undesirable_weight": algo.undesirable_weight}
    accepted = inspect.signature(loss_fn).parameters
    return {k: v for k, v in options.items() if k in accepted}


class PreferenceObjective:
    """The configured loss on batches: policy log-probs, reference log-probs, loss, statistics."""

    def __init__(self, algo: DPOConfig, reference: OnlineReference | None, packed: bool = False, forward=None):
        self.algo, self.reference, self.packed = algo, reference, packed
        # How a computation on the model runs: `TrainEngine.forward` (inside FSDP2's root unit
        # under ddp and fsdp2), a plain call by default.
        self.forward = forward or (lambda fn, *args, **kwargs: fn(*args, **kwargs))
        self.loss_fn = PREFERENCE_LOSSES.get(algo.loss)
        self.options = loss_options(algo, self.loss_fn)
        self.uses_reference = algo.loss not in REFERENCE_FREE_LOSSES

    def logps(self, model, batch: PairBatch | UnpairedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) summed log-probs and lengths of every sequence of the batch, in `item_sequences`
        order: chosen, rejected of each pair; or completion, mismatched completion of each example.

        Pairs take the shared-prompt pass (`algo.share_prompt`) or concatenated rows; packed
        (`trainer.max_tokens_per_micro`), concatenated rows run padding-free, and with
        share_prompt the batch takes whichever of the two computes fewer positions."""
        if isinstance(batch, PairBatch):
            shared, packed = shared_prompt_cost(batch.prompt_mask, batch.response_mask, k=2)
            same_passes = distributed.world_size() > 1  # replicas (ddp, fsdp2) must run the same decoder passes
            if self.algo.share_prompt and (not self.packed or same_passes or shared <= packed):
                return self.forward(shared_prompt_logps, model, **batch.tensors, k=2)
            return self.forward(concatenated_logps, model, **batch.tensors, k=2, packed=self.packed)
        main = self.forward(response_logps, model, batch.input_ids, batch.attention_mask, batch.loss_mask, self.packed)
        kl = self.forward(response_logps, model, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask,
                          self.packed)
        return torch.stack([main[0], kl[0]], 1).reshape(-1), torch.stack([main[1], kl[1]], 1).reshape(-1)

    def reference_logps(self, batch: PairBatch | UnpairedBatch) -> torch.Tensor | None:
        """(2B,) reference log-probs in the same order: precomputed, or from the per-batch
        reference; None when the loss has no reference."""
        if not self.uses_reference:
            return None
        return batch.ref_logps if batch.ref_logps is not None else self.reference(self.logps, batch)

    def pairs(self, pc, pr, lc, lr, rc, rr) -> tuple[torch.Tensor, dict]:
        """The loss over pairs from their (B,) log-probs and lengths, statistics renamed for logs.
        With `algo.length_normalize` the loss sees per-token log-probs (policy and reference)."""
        if self.algo.length_normalize:
            lc1, lr1 = lc.clamp_min(1), lr.clamp_min(1)
            args = (pc / lc1, pr / lr1, None if rc is None else rc / lc1, None if rr is None else rr / lr1)
        else:
            args = (pc, pr, rc, rr)
        loss, stats = self.loss_fn(*args, lc, lr, beta=self.algo.beta, **self.options)
        out = {STAT_NAMES.get(k, k): v for k, v in stats.items()}
        out.update({"logps/chosen": pc.detach().mean(), "logps/rejected": pr.detach().mean(),
                    "nll": -pc.detach().sum() / lc.sum().clamp_min(1)})
        return loss, out

    def pair_step_share(self, model, batch: PairBatch, share: float, token_share: float):
        """This micro-batch's part of the step loss: its mean loss times `share` (its pairs / the
        step's pairs); a token-mean NLL is re-weighted by `token_share` (its chosen tokens / the
        step's chosen tokens) instead."""
        logps, lengths = self.logps(model, batch)  # (2B,): chosen at even rows, rejected at odd
        ref = self.reference_logps(batch)
        rc, rr = (None, None) if ref is None else (ref[0::2], ref[1::2])
        loss, stats = self.pairs(logps[0::2], logps[1::2], lengths[0::2], lengths[1::2], rc, rr)
        loss = loss * share
        if self.algo.loss in TOKEN_MEAN_NLL:
            nll = -logps[0::2].sum() / lengths[0::2].sum().clamp_min(1)
            loss = loss + nll * (token_share - share)
        return loss, stats

    def kto_point(self, model, micro: list[UnpairedBatch], refs: list[torch.Tensor]) -> torch.Tensor:
        """z0 for the whole step, from every micro-batch's mismatched pairs (on every replica),
        without gradient."""
        with torch.no_grad():
            policy = torch.cat([self.forward(response_logps, model, b.kl_input_ids, b.kl_attention_mask,
                                             b.kl_loss_mask, self.packed)[0] for b in micro])
        ref = torch.cat([r[1::2] for r in refs])
        if distributed.world_size() == 1:
            return kto_reference_point(policy, ref)
        total, count = distributed.all_sum([float((policy - ref).sum()), len(policy)])
        return torch.tensor(total / count).clamp_min(0)  # kto_reference_point over every replica's pairs

    def unpaired_step_share(self, model, batch: UnpairedBatch, ref: torch.Tensor, z0: torch.Tensor, share: float):
        logps, _ = self.forward(response_logps, model, batch.input_ids, batch.attention_mask, batch.loss_mask,
                                self.packed)  # (B,)
        loss, stats = self.loss_fn(logps, ref[0::2], batch.desirable, z0, beta=self.algo.beta, **self.options)
        out = {STAT_NAMES.get(k, k): v for k, v in stats.items()}
        out.update({"logps/chosen": masked_mean(logps.detach(), batch.desirable),
                    "logps/rejected": masked_mean(logps.detach(), ~batch.desirable)})
        return loss * share, out


def step_loss(objective: PreferenceObjective, model, micro: list, step_items: int | None = None,
              engine: TrainEngine | None = None) -> tuple[float, dict]:
    """Forward and backward every micro-batch of one optimizer step; returns the step's loss and
    its statistics (means over the step). Each micro-batch weighs its share of the step's items,
    so micro-batches of unequal sizes (token budgets) add up to the step's mean. step_items: the
    step's pairs (or examples) over all data-parallel replicas, each replica's micro-batches
    holding its share (default: these). engine: runs the backwards (ddp all-reduces in the last)."""
    sizes = [len(b.desirable if isinstance(b, UnpairedBatch) else b.prompt_ids) for b in micro]
    step_items = step_items or sum(sizes)
    if isinstance(micro[0], PairBatch):
        chosen_tokens = [b.chosen_tokens for b in micro]
        all_tokens = distributed.all_sum([sum(chosen_tokens)])[0]
        parts = (objective.pair_step_share(model, b, n / step_items, t / all_tokens)
                 for b, n, t in zip(micro, sizes, chosen_tokens))
    else:
        refs = [objective.reference_logps(b) for b in micro]  # (2B,) each: example, mismatched twin
        z0 = objective.kto_point(model, micro, refs)
        parts = (objective.unpaired_step_share(model, b, ref, z0, n / step_items)
                 for b, ref, n in zip(micro, refs, sizes))
    total, stats = 0.0, {}
    for i, ((loss, micro_stats), n) in enumerate(zip(parts, sizes)):
        if engine is not None:
            engine.backward(loss, last=i == len(micro) - 1)
        else:
            loss.backward()
        total += float(loss.detach())
        for k, v in micro_stats.items():
            stats[k] = stats.get(k, 0.0) + float(v) * n / step_items
    total, *summed = distributed.all_sum([total, *stats.values()])
    return total, dict(zip(stats, summed))


def prepare_reference(model, groups: list[list[dict]], cfg: RunConfig, tokenizer,
                      forward=None) -> tuple[OnlineReference | None, str]:
    """Precompute the reference log-probs into the items of `groups` (`algo.precompute_reference`),
    or make the per-batch reference; neither for a reference-free loss. Returns it and a note for
    the log.

    `train` passes the training items the run will visit and the held-out items, not the whole
    training set: a short run (a smoke test, `max_steps=3`) pays for the pairs it uses only.
    Precomputing them (rather than computing each batch's as the run reaches it) keeps memory
    flat with full fine-tuning, whose reference is the initial weights: computed before the
    first update, it needs no frozen copy of the model; and LoRA takes the same path.
    """
    algo = cfg.algo
    if algo.loss in REFERENCE_FREE_LOSSES:
        return None, "none (reference-free loss)"
    if not algo.precompute_reference:
        return OnlineReference(model, lora=cfg.model.finetune == "lora"), "computed per batch"
    t0 = time.perf_counter()
    hit = precompute_reference(model, PreferenceObjective(algo, None, packed_passes(cfg), forward), groups, cfg,
                               tokenizer)
    counts = " + ".join(str(len(g)) for g in groups)
    return None, f"{'read from cache' if hit else 'precomputed'} for {counts} items in {time.perf_counter() - t0:.1f}s"


# ---------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model, objective: PreferenceObjective, items: list[dict], pad_id: int, batch_size: int) -> dict:
    """Held-out metrics over `items`, computed on the whole set at once (not batch means).

    Pairs: the loss and its implicit-reward statistics (for KTO, whose implicit reward
    beta log pi/pi_ref is DPO's, the sigmoid loss's statistics without its loss value), the
    summed log-probs, `logp_accuracy` (the fraction of pairs whose chosen response has the
    higher mean per-token log-prob) and the chosen responses' NLL per token.
    Unpaired (KTO data): the KTO loss with z0 from the held-out mismatched pairs.
    """
    if not items:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logps, lengths, refs = [], [], []
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size], pad_id, device)
        batch_logps, batch_lengths = objective.logps(model, batch)
        logps.append(batch_logps)
        lengths.append(batch_lengths)
        refs.append(objective.reference_logps(batch))
    model.train(was_training)
    logps, lengths = torch.cat(logps), torch.cat(lengths)  # (2N,): even rows chosen / example, odd rejected / twin
    ref = None if refs[0] is None else torch.cat(refs)
    if "chosen_ids" not in items[0]:
        desirable = torch.tensor([bool(x["label"]) for x in items], device=device)
        loss, stats = objective.loss_fn(logps[0::2], ref[0::2], desirable, kto_reference_point(logps[1::2], ref[1::2]),
                                        beta=objective.algo.beta, **objective.options)
        return {"loss": float(loss), **{STAT_NAMES.get(k, k): float(v) for k, v in stats.items()}}
    pairs = objective if objective.algo.loss != "kto" else _dpo_statistics(objective)
    pc, pr, lc, lr = logps[0::2], logps[1::2], lengths[0::2], lengths[1::2]
    loss, stats = pairs.pairs(pc, pr, lc, lr, None if ref is None else ref[0::2], None if ref is None else ref[1::2])
    out = {k: float(v) for k, v in stats.items()}
    if objective.algo.loss != "kto":
        out["loss"] = float(loss)
    out["logp_accuracy"] = float((pc / lc.clamp_min(1) > pr / lr.clamp_min(1)).float().mean())
    return out


def _dpo_statistics(kto: PreferenceObjective) -> PreferenceObjective:
    """KTO's held-out pairs are scored with DPO's implicit reward beta log pi/pi_ref."""
    algo = kto.algo
    return PreferenceObjective(DPOConfig(loss="sigmoid", beta=algo.beta, share_prompt=algo.share_prompt), kto.reference,
                               kto.packed)


def packed_passes(cfg: RunConfig) -> bool:
    """Padding-free passes: with token-budget micro-batches (`trainer.max_tokens_per_micro`)."""
    return cfg.trainer.max_tokens_per_micro is not None


def item_tokens(item: dict) -> int:
    """An item's tokens in a padding-free pass: the prompt + response of each of its two sequences."""
    return sum(len(p) + len(r) for p, r in item_sequences(item))


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


# -------------------------------------------------------------------------------------- driver


def train(cfg: RunConfig, hydra_cfg=None) -> dict:
    """Run the configured preference loss; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    tcfg, algo = cfg.trainer, cfg.algo
    # 1. Run directory, seed and threads.
    out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
    set_threads(tcfg.num_threads)
    seed_everything(cfg.seed)

    # 2. One model: the policy (full fine-tuning, or a LoRA adapter over the frozen base).
    model, tokenizer = build_policy(cfg.model, meta=on_meta(tcfg))
    model.train()
    device, pad_id = model_device(model, cfg.model), tokenizer.pad_token_id
    engine = TrainEngine(tcfg.precision, device, strategy=tcfg.strategy,  # every forward below runs through it
                         activation_checkpointing=tcfg.gradient_checkpointing, shard_size=tcfg.fsdp_shard_size)
    engine.prepare(model)  # checkpointed layers; fp32 masters under bf16-mixed; sharded under fsdp2

    # 3. Data: pairs (or unpaired KTO examples), split deterministically, tokenized.
    data = load_preference_data(cfg.data, algo, tokenizer, cfg.seed)
    val_items = data.val[: tcfg.eval_batches * tcfg.batch_size]
    order = EpochBatches(len(data.train), tcfg.batch_size, seed=cfg.seed)

    # 4. The reference, before any update (and before a checkpoint is loaded): precomputed for the
    #    training items steps 1..max_steps visit and the held-out items, or read from the disk
    #    cache; or a per-batch reference; none for reference-free losses.
    visited = [data.train[i] for i in visited_items(order, tcfg.max_steps * tcfg.grad_accum)]
    with engine.autocast():
        reference, ref_note = prepare_reference(model, [visited, val_items], cfg, tokenizer, engine.forward)
    objective = PreferenceObjective(algo, reference, packed_passes(cfg), engine.forward)

    # 5. Optimizer, schedule, and resume from the newest checkpoint when there is one.
    optimizer = build_optimizer(model.named_parameters(), tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    ckpt = Checkpointer(out, keep=tcfg.keep_checkpoints)
    resume_from = ckpt.latest() if tcfg.resume == "auto" else (None if tcfg.resume == "never" else Path(tcfg.resume))
    start, state = 0, {}
    if resume_from is not None:
        state, _ = ckpt.load(Path(resume_from), model=model, optimizers={"policy": optimizer},
                             schedulers={"policy": scheduler})
        start = state["step"]
        order.load_state_dict(state["data"])
    log = run_logger(out, total_steps=tcfg.max_steps, start_step=start, progress=tcfg.progress, desc=f"dpo/{algo.loss}",
                    headline=("loss", "rewards/accuracy", "val/rewards/accuracy", "samples_per_s"),
                    trainer=tcfg, started=started)
    log.write(f"data: {data.stats_line}; train {len(data.train)} items, val {len(val_items)}; reference: {ref_note}")
    if resume_from is not None:
        log.write(f"resumed from {resume_from} at step {start}")
        val_before, val_after = state["val_before"], state["val_after"]
    else:
        with engine.autocast():
            val_before = val_after = evaluate(model, objective, val_items, pad_id, algo.reference_batch_size)
        log.log(0, _prefixed("val", val_before))

    # 6. The loop: micro-batches -> loss share -> backward; clip, step; evaluate, checkpoint.
    for step in range(start + 1, tcfg.max_steps + 1):
        t0 = time.perf_counter()
        drawn = [[data.train[i] for i in order.next()] for _ in range(tcfg.grad_accum)]  # every replica: the same
        micro = [collate(b, pad_id, device) for b in replica_micro_batches(drawn, tcfg.max_tokens_per_micro, item_tokens)]
        with engine.autocast():  # each replica: its share of every micro-batch
            loss, stats = step_loss(objective, model, micro, step_items=sum(len(mb) for mb in drawn), engine=engine)
        if not math.isfinite(loss):
            raise FloatingPointError(f"dpo: loss is {loss} at step {step}; last checkpoint kept in {ckpt.root}")
        grad_norm = engine.step([p for p in model.parameters() if p.requires_grad], optimizer, tcfg.max_grad_norm)
        scheduler.step()
        seconds = time.perf_counter() - t0
        metrics = {"loss": loss, **stats, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                   "samples_per_s": tcfg.batch_size * tcfg.grad_accum / seconds, "epoch": order.epoch}
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            with engine.autocast():
                val_after = evaluate(model, objective, val_items, pad_id, algo.reference_batch_size)
            metrics.update(_prefixed("val", val_after))
        log.log(step, metrics, advance=1)
        save_or_stop(step, tcfg, lambda step=step, val_after=val_after: ckpt.save(
            step, model=model, optimizers={"policy": optimizer}, schedulers={"policy": scheduler},
            trainer_state={"data": order.state_dict(), "val_before": val_before, "val_after": val_after}), log)
    log.close()

    # 7. Save the final model (or adapter) with its tokenizer, and the summary (rank 0).
    if not save_final(engine, model, tokenizer, out / "final"):
        return {}  # the other replicas: rank 0 writes the summary
    summary = {"algo": "dpo", "loss": algo.loss, "steps": tcfg.max_steps, "val_before": val_before,
               "val_after": val_after, "train_items": len(data.train), "val_items": len(val_items),
               "reference": ref_note, "reference_items": sum("ref" in x for x in data.train + val_items),
               "data": data.stats, "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    acc = "rewards/accuracy"
    print(f"DPO ({algo.loss}) done: held-out accuracy {val_before.get(acc, float('nan')):.3f} -> "
          f"{val_after.get(acc, float('nan')):.3f}  (outputs in {out})")
    return summary
