"""Reward-model training: the Bradley-Terry loss on preference pairs.

    python -m align algo=rm                               # reward LoRA + score head, HH-RLHF pairs
    python -m align algo=rm model.finetune=full           # the whole model + score head
    python -m align algo=rm algo.margin=margin            # per-pair margins from a data column

The reward model scores a whole sequence x + y with a linear head on the last hidden state at
its last token, r(x, y) = w^T h_T (InstructGPT, Ouyang et al. 2022, Sec. 3.5), and is trained
so that the chosen response of a pair outscores the rejected one:
loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m) (`align.core.bradley_terry_loss`).

One optimizer step:

1. takes `grad_accum` micro-batches of B pairs; each is one (2B, T) forward of the reward role,
   chosen rows over rejected rows, giving (2B,) scores;
2. scales each micro-batch's mean loss by its share of the step's pairs, so the step's loss is
   the mean over all of its pairs and 2 x 4 accumulation gives the gradient of 1 x 8;
3. clips, steps, logs accuracy, chosen/rejected score means and their margin, evaluates the
   held-out pairs (at step 0 and every `eval_every`) and checkpoints for exact resume.

At the end the run writes `reward/` (`save_role`: the adapter or full model and
score_head.safetensors; PPO loads it as its reward role with `reward.model_path=<out>/reward`,
i.e. `model.load_role("reward", <out>/reward)`) and `reward_model/` (an
`AutoModelForSequenceClassification` folder with the adapter merged).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from align.config import DataConfig, ModelConfig, RMConfig, RunConfig
from align.core import bradley_terry_loss
from align.engine import TrainEngine, distributed
from align.lifecycle import save_or_stop
from align.trainers.checkpoint import Checkpointer
from align.trainers.common import (
    EpochBatches,
    build_optimizer,
    build_scheduler,
    prepare_output_dir,
    replica_micro_batches,
    seed_everything,
    set_threads,
)
from align.trainers.metrics import run_logger
from align.trainers.setup import model_device, on_meta

# bradley_terry_loss's statistics, under the names the logs use.
STAT_NAMES = {"chosen_rewards": "scores/chosen", "rejected_rewards": "scores/rejected",
              "margins": "scores/margin", "accuracy": "accuracy"}


# --------------------------------------------------------------------------------------- model


def build_reward_model(cfg: ModelConfig, meta: bool = False):
    """The reward role and its tokenizer (with a pad token).

    finetune=lora: a `MultiHeadModel` with only the `reward` role (a LoRA adapter from
    `cfg.lora` plus the score head) over the frozen base, the layout PPO loads it into.
    finetune=full: `SeparateModels` holding the whole model plus the score head, no reference.
    meta: built on the meta device, for `TrainEngine.prepare` to fill from rank 0.
    """
    from align.trainers.setup import load_base, role_config

    base, tokenizer = load_base(cfg, meta)
    if cfg.finetune == "lora":
        from align.models.multihead import MultiHeadModel

        model = MultiHeadModel(base, {"reward": role_config(cfg)}, pad_token_id=tokenizer.pad_token_id)
    else:
        from align.models.separate import SeparateModels

        base.requires_grad_(True)
        model = SeparateModels({"reward": base}, reference=None, pad_token_id=tokenizer.pad_token_id)
    return model, tokenizer


# ---------------------------------------------------------------------------------------- data


@dataclass
class PairData:
    """Tokenized pairs {prompt_ids, chosen_ids, rejected_ids[, margin]}, with the data counts."""

    train: list[dict]
    val: list[dict]
    stats: dict
    stats_line: str


def read_margins(cfg: DataConfig, column: str, stats) -> list[tuple[object, float]]:
    """(pair example, margin) for every good row of `cfg.source`, the margin read from `column`.

    The data layer's pair examples carry no extra fields, so the rows are parsed here with the
    format's own parser; a missing or non-numeric margin is a bad row like any other (raised
    naming file, line and field, or skipped and counted).
    """
    from align.data import DataError, get_format, read_rows
    from align.data.formats import resolve_columns

    fmt = get_format(cfg.format)
    cols = resolve_columns(fmt, dict(cfg.columns))
    out = []
    for row in read_rows(cfg.source, split=cfg.split, on_error=cfg.on_error, stats=stats):
        try:
            example = fmt.parse(row, cols)
            margin = row.data.get(column)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
                raise DataError(row.origin, row.line, column, f"expected a finite number (algo.margin), got {margin!r}",
                                "missing_field" if margin is None else "wrong_type")
        except DataError as err:
            if cfg.on_error == "raise":
                raise
            stats.skip(err)
            continue
        stats.examples_loaded += 1
        out.append((example, float(margin)))
        if cfg.limit is not None and len(out) >= cfg.limit:
            break
    return out


def load_pair_data(cfg: DataConfig, margin, tokenizer, length_balance: bool = False) -> PairData:
    """Read, split deterministically and tokenize `cfg.source`; attach `margin` to each pair;
    with `length_balance`, balance the training pairs' lengths (`balance_lengths`).

    margin: None, a number (every pair), or a column name (each pair's own). The split is the
    data layer's (`build_split`), keyed by the pair's content, so it does not depend on margins.
    """
    from align.data import DataStats, build_split, tokenize_pairs, train_val_split
    from align.data.split import content_key

    stats = DataStats()
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
              max_response_length=cfg.max_response_length, overlong=cfg.overlong, stats=stats)
    if isinstance(margin, str):
        pairs = read_margins(cfg, margin, stats)
        _check_paired(cfg, [ex for ex, _ in pairs])
        split = dict(val_size=min(cfg.val_size, len(pairs))) if cfg.val_size is not None else dict(val_fraction=cfg.val_fraction)
        halves = train_val_split(pairs, seed=cfg.seed, key=lambda p: content_key(p[0]), **split)
        # one pair per call keeps each margin with its pair when an over-long pair is dropped
        train, val = ([dict(item, margin=m) for ex, m in half for item in tokenize_pairs([ex], tokenizer, **kw)]
                      for half in halves)
        stats.examples_tokenized = len(train) + len(val)
    else:
        examples = build_split(cfg.source, cfg.format, val_fraction=cfg.val_fraction, val_size=cfg.val_size,
                               seed=cfg.seed, columns=dict(cfg.columns), on_error=cfg.on_error, limit=cfg.limit,
                               split=cfg.split, stats=stats)
        _check_paired(cfg, examples[0] + examples[1])
        train, val = (tokenize_pairs(half, tokenizer, **kw) for half in examples)
        if margin is not None:
            for item in train + val:
                item["margin"] = float(margin)
    if length_balance:
        train = balance_lengths(train, cfg.seed)
    if not train:
        raise ValueError(f"data.source {cfg.source}: no training pairs left (format {cfg.format!r}); {stats.summary()}")
    return PairData(train, val, stats.as_dict(), stats.summary())


def balance_lengths(items: list[dict], seed: int) -> list[dict]:
    """The training pairs with "longer response wins" made uninformative: every pair whose
    chosen response is the shorter (in tokens, as the model reads it) and every tie is kept,
    and as many pairs with the chosen response the longer are drawn (deterministically, without
    replacement) from the larger side; the other side is kept whole.

    Length balancing of Singhal et al. 2023 ("A Long Way to Go", arXiv:2310.03716, Sec. 4):
    where preferred responses are longer more often than not (HH-RLHF helpful-base: 60% by
    characters), a reward model learns length first and carries that bias to data where it
    does not hold (helpful-online: the chosen response is the longer in 43% of pairs).
    """
    sign = [(len(x["chosen_ids"]) > len(x["rejected_ids"])) - (len(x["chosen_ids"]) < len(x["rejected_ids"]))
            for x in items]
    longer, shorter = [i for i, s in enumerate(sign) if s > 0], [i for i, s in enumerate(sign) if s < 0]
    big, small = (longer, shorter) if len(longer) >= len(shorter) else (shorter, longer)
    drawn = torch.randperm(len(big), generator=torch.Generator().manual_seed(seed))[: len(small)]
    dropped = set(big) - {big[i] for i in drawn.tolist()}
    return [x for i, x in enumerate(items) if i not in dropped]


def _check_paired(cfg: DataConfig, examples: list) -> None:
    from align.data import PairExample

    other = next((ex for ex in examples if not isinstance(ex, PairExample)), None)
    if other is not None:
        raise ValueError(f"algo=rm needs preference pairs; data.format={cfg.format!r} gives {type(other).__name__}")


@dataclass
class RMBatch:
    """B preference pairs as one forward of the reward model.

    input_ids, attention_mask: (2B, T), right-padded; rows [0, B) prompt+chosen, rows [B, 2B)
        prompt+rejected of the same pairs.
    margin: (B,) each pair's margin m, or None (plain Bradley-Terry).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    margin: torch.Tensor | None

    @property
    def num_pairs(self) -> int:
        return len(self.input_ids) // 2


def pair_tokens(item: dict) -> int:
    """A pair's tokens in a padding-free pass: prompt + chosen and prompt + rejected."""
    return 2 * len(item["prompt_ids"]) + len(item["chosen_ids"]) + len(item["rejected_ids"])


def collate(items: list[dict], pad_id: int, device: torch.device) -> RMBatch:
    from align.data import collate_pairs

    both = collate_pairs(items, pad_id)
    margin = torch.tensor([x["margin"] for x in items], dtype=torch.float32, device=device) if "margin" in items[0] else None
    return RMBatch(both["input_ids"].to(device), both["attention_mask"].to(device), margin)


# ------------------------------------------------------------------------------------ the loss


def pair_scores(model, batch: RMBatch, engine: TrainEngine | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) fp32 scores of the chosen and of the rejected responses, from one (2B, T) forward in
    the engine's compute precision."""
    with engine.autocast() if engine is not None else contextlib.nullcontext():
        forward = engine.forward if engine is not None else (lambda fn, *a: fn(*a))
        scores = forward(model.scores, batch.input_ids, batch.attention_mask).float()  # (2B,)
    return scores[: batch.num_pairs], scores[batch.num_pairs :]


def step_loss(model, micro: list[RMBatch], engine: TrainEngine | None = None,
              n_pairs: int | None = None) -> tuple[float, dict]:
    """Forward and backward every micro-batch of one optimizer step; returns the step's loss
    (the mean over all its pairs) and its statistics (pair-weighted means over the step).
    n_pairs: the step's pairs over all data-parallel replicas (default: this replica's), each
    replica's micro-batches holding its share; the returned figures are then the step's."""
    n_pairs = n_pairs or sum(b.num_pairs for b in micro)
    total, stats = 0.0, {}
    for i, batch in enumerate(micro):
        share = batch.num_pairs / n_pairs
        loss, micro_stats = bradley_terry_loss(*pair_scores(model, batch, engine), batch.margin)
        if engine is not None:
            engine.backward(loss * share, last=i == len(micro) - 1)
        else:
            (loss * share).backward()
        total += float(loss.detach()) * share
        for k, v in micro_stats.items():
            stats[STAT_NAMES[k]] = stats.get(STAT_NAMES[k], 0.0) + float(v) * share
    total, *summed = distributed.all_sum([total, *stats.values()])
    return total, dict(zip(stats, summed))


@torch.no_grad()
def evaluate(model, items: list[dict], pad_id: int, batch_size: int, engine: TrainEngine | None = None) -> dict:
    """Held-out loss, accuracy, chosen/rejected score means and margin, over all `items` at
    once (not batch means), plus the mean and std of every score (what PPO's rewards look like)."""
    if not items:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected, margins = [], [], []
    for i in range(0, len(items), batch_size):
        batch = collate(items[i : i + batch_size], pad_id, device)
        c, r = pair_scores(model, batch, engine)
        chosen.append(c)
        rejected.append(r)
        if batch.margin is not None:
            margins.append(batch.margin)
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    loss, stats = bradley_terry_loss(c, r, torch.cat(margins) if margins else None)
    both = torch.cat([c, r])
    return {"loss": float(loss), **{STAT_NAMES[k]: float(v) for k, v in stats.items()},
            "scores/mean": float(both.mean()), "scores/std": float(both.std(correction=0))}


def _prefixed(prefix: str, metrics: dict) -> dict:
    return {f"{prefix}/{k}": v for k, v in metrics.items()}


# -------------------------------------------------------------------------------------- driver


def train(cfg: RunConfig, hydra_cfg=None) -> dict:
    """Train the reward model as configured; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    tcfg, algo = cfg.trainer, cfg.algo
    assert isinstance(algo, RMConfig)
    # 1. Run directory, seed and threads.
    out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
    set_threads(tcfg.num_threads)
    seed_everything(cfg.seed)

    # 2. The reward role: a LoRA adapter + score head on the frozen base, or a full model + head.
    model, tokenizer = build_reward_model(cfg.model, meta=on_meta(tcfg))
    model.packed = tcfg.max_tokens_per_micro is not None  # padding-free passes in token-budget micro-batches
    model.train()
    engine = TrainEngine(tcfg.precision, model_device(model, cfg.model), strategy=tcfg.strategy,
                         activation_checkpointing=tcfg.gradient_checkpointing, shard_size=tcfg.fsdp_shard_size)
    engine.prepare(model)  # checkpointed layers; fp32 masters under bf16-mixed; sharded under fsdp2
    device, pad_id = next(model.parameters()).device, tokenizer.pad_token_id

    # 3. Data: pairs (with their margins), split deterministically, tokenized.
    data = load_pair_data(cfg.data, algo.margin, tokenizer, algo.length_balance)
    val_items = data.val[: tcfg.eval_batches * tcfg.batch_size]
    order = EpochBatches(len(data.train), tcfg.batch_size, seed=cfg.seed)

    # 4. Optimizer over the role's adapter (or weights) and its head; resume when there is a checkpoint.
    optimizer = build_optimizer(model.trainable_parameters("reward"), tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    ckpt = Checkpointer(out, keep=tcfg.keep_checkpoints)
    resume_from = ckpt.latest() if tcfg.resume == "auto" else (None if tcfg.resume == "never" else Path(tcfg.resume))
    start, state = 0, {}
    if resume_from is not None:
        state, _ = ckpt.load(Path(resume_from), model=model, optimizers={"reward": optimizer},
                             schedulers={"reward": scheduler})
        start = state["step"]
        order.load_state_dict(state["data"])
    log = run_logger(out, total_steps=tcfg.max_steps, start_step=start, progress=tcfg.progress, desc="rm",
                    headline=("loss", "accuracy", "val/accuracy", "pairs_per_s"), trainer=tcfg, started=started)
    log.write(f"data: {data.stats_line}; train {len(data.train)} pairs, val {len(val_items)}; "
              f"model: {cfg.model.finetune}, margin: {algo.margin}")
    if resume_from is not None:
        log.write(f"resumed from {resume_from} at step {start}")
        val_before = state["val_before"]
    else:
        val_before = evaluate(model, val_items, pad_id, tcfg.batch_size, engine)
        log.log(0, _prefixed("val", val_before))

    # 5. The loop: micro-batches -> scores -> Bradley-Terry share -> backward; clip, step; evaluate, checkpoint.
    val_after = val_before
    for step in range(start + 1, tcfg.max_steps + 1):
        t0 = time.perf_counter()
        drawn = [[data.train[i] for i in order.next()] for _ in range(tcfg.grad_accum)]  # every replica: the same
        micro = [collate(b, pad_id, device) for b in replica_micro_batches(drawn, tcfg.max_tokens_per_micro, pair_tokens)]
        loss, stats = step_loss(model, micro, engine, n_pairs=sum(len(mb) for mb in drawn))  # this replica's share
        if not math.isfinite(loss):
            raise FloatingPointError(f"rm: loss is {loss} at step {step}; last checkpoint kept in {ckpt.root}")
        grad_norm = engine.step(model.trainable_parameters("reward"), optimizer, tcfg.max_grad_norm)
        scheduler.step()
        seconds = time.perf_counter() - t0
        metrics = {"loss": loss, **stats, "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                   "pairs_per_s": tcfg.batch_size * tcfg.grad_accum / seconds, "epoch": order.epoch}
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val_after = evaluate(model, val_items, pad_id, tcfg.batch_size, engine)
            metrics.update(_prefixed("val", val_after))
        log.log(step, metrics, advance=1)
        save_or_stop(step, tcfg, lambda step=step: ckpt.save(
            step, model=model, optimizers={"reward": optimizer}, schedulers={"reward": scheduler},
            trainer_state={"data": order.state_dict(), "val_before": val_before}), log)
    log.close()

    # 6. The reward role (PPO's reward.model_path), the sequence-classifier export, the summary.
    with engine.gathered(model):
        if distributed.is_main():
            model.save_role("reward", str(out / "reward"))
            tokenizer.save_pretrained(out / "reward")
            if algo.export:
                model.export_reward_model(str(out / "reward_model"), tokenizer)
    if not distributed.is_main():
        return {}
    summary = {"algo": "rm", "finetune": cfg.model.finetune, "margin": algo.margin, "steps": tcfg.max_steps,
               "val_before": val_before, "val_after": val_after, "train_pairs": len(data.train),
               "val_pairs": len(val_items), "data": data.stats, "reward_path": str(out / "reward"),
               "reward_model_path": str(out / "reward_model") if algo.export else None, "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"RM done: held-out accuracy {val_before.get('accuracy', float('nan')):.3f} -> "
          f"{val_after.get('accuracy', float('nan')):.3f}  (reward role in {out / 'reward'})")
    return summary
