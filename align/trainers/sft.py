"""Supervised fine-tuning: next-token loss on the response tokens only.

    python -m align algo=sft model=stories260k data=hh_sft trainer.max_steps=150

The prompt tokens are masked out of the loss (labels = -100), so the model learns to answer,
not to echo the question. One optimizer step sees `batch_size * grad_accum` examples; the loss
is normalised over the whole step (all its response tokens, or all its sequences), never per
micro-batch, so 2 x 4 accumulation gives the same gradient as 1 x 8.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass

import torch

from align.config import RunConfig
from align.core import masked_sum
from align.engine import TrainEngine, distributed
from align.lifecycle import save_or_stop
from align.models.roles import head_logprobs, lm_backbone, packed_hidden, packed_token_logprobs
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
from align.trainers.metrics import run_logger
from align.trainers.setup import build_policy, load_sft_data, model_device, on_meta


@dataclass
class SFTBatch:
    """A right-padded micro-batch.

    input_ids:      (B, T) prompt + response + eos, then pad.
    attention_mask: (B, T) 1 on real tokens.
    labels:         (B, T) the token ids where the loss applies (response and eos), else -100.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int((self.labels[:, 1:] != -100).sum())


def token_nll(model: torch.nn.Module, batch: SFTBatch, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the next token.

    Returns nll (B, T-1) and mask (B, T-1): position t scores token t+1, and the mask is 1
    where that token is a response token. `packed`: the rows run padding-free, packed
    (`trainer.max_tokens_per_micro`), the LM head on response positions only; same numbers.
    """
    targets = batch.labels[:, 1:]  # (B, T-1)
    if packed:
        hidden, index = packed_hidden(lm_backbone(model), batch.input_ids, batch.attention_mask)  # (1, N, H)
        logp = packed_token_logprobs(model, hidden, batch.input_ids, index, tuple(batch.input_ids.shape),
                                     score_mask=targets != -100)  # (B, T-1) fp32; 0 off the response
    else:
        hidden = lm_backbone(model)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    use_cache=False).last_hidden_state  # (B, T, H)
        logp = head_logprobs(model, hidden[:, :-1], targets)  # (B, T-1) fp32, the LM head in chunks; -100: 0
    mask = (targets != -100).to(logp.dtype)
    return -logp * mask, mask


def response_tokens(item: dict) -> int:
    """Tokens of a tokenized SFT example that the loss scores (`SFTBatch.num_tokens` of one row)."""
    return sum(1 for label in item["labels"][1:] if label != -100)


def sft_loss(nll: torch.Tensor, mask: torch.Tensor, mode: str, normaliser: float) -> torch.Tensor:
    """The micro-batch's share of the step loss.

    token-mean:          sum of token NLLs / `normaliser` (response tokens in the whole step).
    seq-mean-token-mean: sum over sequences of their mean NLL / `normaliser` (sequences in the step).
    """
    if mode == "token-mean":
        return masked_sum(nll, mask) / normaliser
    per_seq = masked_sum(nll, mask, dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_seq.sum() / normaliser


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[SFTBatch], engine: TrainEngine | None = None,
             packed: bool = False) -> float:
    """Mean NLL per response token over the validation batches (in the engine's compute precision)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:  # every replica runs every batch: the same result, the same collectives
        with engine.autocast() if engine is not None else contextlib.nullcontext():
            nll, mask = (engine.forward(token_nll, model, batch, packed) if engine is not None
                         else token_nll(model, batch, packed))
        total += float(nll.sum())
        count += int(mask.sum())
    model.train(was_training)
    return total / max(count, 1)


def train(cfg: RunConfig, hydra_cfg=None) -> dict:
    """Run SFT as configured; returns the summary (also written to summary.json)."""
    started = time.perf_counter()
    tcfg, algo = cfg.trainer, cfg.algo
    # 1. Run directory, seed and threads.
    out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
    set_threads(tcfg.num_threads)
    seed_everything(cfg.seed)

    # 2. Model and tokenizer: full fine-tuning, or a LoRA adapter over a frozen base.
    model, tokenizer = build_policy(cfg.model, meta=on_meta(tcfg))
    model.train()
    engine = TrainEngine(tcfg.precision, model_device(model, cfg.model), strategy=tcfg.strategy,
                         activation_checkpointing=tcfg.gradient_checkpointing, shard_size=tcfg.fsdp_shard_size)
    engine.prepare(model)  # checkpointed layers; fp32 masters under bf16-mixed; sharded under fsdp2

    # 3. Data: read, split deterministically, tokenize with the prompt masked.
    data = load_sft_data(cfg.data, tokenizer)
    collate = data.collate
    packed = tcfg.max_tokens_per_micro is not None  # padding-free passes in token-budget micro-batches
    val_batches = [
        collate(data.val[i : i + tcfg.batch_size]) for i in range(0, len(data.val), tcfg.batch_size)
    ][: tcfg.eval_batches]
    order = EpochBatches(len(data.train), tcfg.batch_size, seed=cfg.seed)

    # 4. Optimizer, schedule, and resume from the newest checkpoint when there is one.
    optimizer = build_optimizer(model.named_parameters(), tcfg)
    scheduler = build_scheduler(optimizer, tcfg)
    ckpt = Checkpointer(out, keep=tcfg.keep_checkpoints)
    start, state = 0, {}
    resume_from = ckpt.latest() if tcfg.resume == "auto" else (None if tcfg.resume == "never" else tcfg.resume)
    if resume_from is not None:
        from pathlib import Path

        state, _ = ckpt.load(Path(resume_from), model=model, optimizers={"policy": optimizer},
                             schedulers={"policy": scheduler})
        start = state["step"]
        order.load_state_dict(state["data"])
    log = run_logger(out, total_steps=tcfg.max_steps, start_step=start, progress=tcfg.progress,
                    desc="sft", headline=("loss", "val_loss", "tokens_per_s"), trainer=tcfg, started=started)
    log.write(data.stats_line)
    if resume_from is not None:
        log.write(f"resumed from {resume_from} at step {start}")
        val_before = state["val_loss_before"]
    else:
        val_before = evaluate(model, val_batches, engine, packed)
        log.log(0, {"val_loss": val_before})

    # 5. The loop: accumulate micro-batches, clip, step; evaluate and checkpoint periodically.
    #    With N replicas every one draws the same micro-batches and trains on its share of each.
    val_loss = val_before
    for step in range(start + 1, tcfg.max_steps + 1):
        t0 = time.perf_counter()
        drawn = [[data.train[i] for i in order.next()] for _ in range(tcfg.grad_accum)]
        normaliser = (
            sum(response_tokens(r) for mb in drawn for r in mb) if algo.loss_agg == "token-mean"
            else sum(len(mb) for mb in drawn)
        )
        micro = [collate(b) for b in replica_micro_batches(drawn, tcfg.max_tokens_per_micro, lambda x: len(x["input_ids"]))]
        step_loss = 0.0
        for i, batch in enumerate(micro):
            with engine.autocast():
                nll, mask = engine.forward(token_nll, model, batch, packed)
            loss = sft_loss(nll, mask, algo.loss_agg, normaliser)
            engine.backward(loss, last=i == len(micro) - 1)
            step_loss += float(loss.detach())
        step_loss, tokens = distributed.all_sum([step_loss, sum(int(b.attention_mask.sum()) for b in micro)])
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"sft: loss is {step_loss} at step {step}; last checkpoint kept in {ckpt.root}")
        grad_norm = engine.step([p for p in model.parameters() if p.requires_grad], optimizer, tcfg.max_grad_norm)
        scheduler.step()
        seconds = time.perf_counter() - t0
        metrics = {
            "loss": step_loss,
            "grad_norm": float(grad_norm),
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": tokens / seconds,
            "epoch": order.epoch,
        }
        if step % tcfg.eval_every == 0 or step == tcfg.max_steps:
            val_loss = evaluate(model, val_batches, engine, packed)
            metrics["val_loss"] = val_loss
        log.log(step, metrics, advance=1)
        save_or_stop(step, tcfg, lambda step=step: ckpt.save(
            step, model=model, optimizers={"policy": optimizer}, schedulers={"policy": scheduler},
            trainer_state={"data": order.state_dict(), "val_loss_before": val_before}), log)
    log.close()

    # 6. Save the final model (or adapter) with its tokenizer, and the summary (rank 0).
    if not save_final(engine, model, tokenizer, out / "final"):
        return {}  # the other replicas: rank 0 writes the summary
    summary = {
        "algo": "sft",
        "steps": tcfg.max_steps,
        "val_loss_before": val_before,
        "val_loss_after": val_loss,
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "data": data.stats,
        "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"SFT done: validation loss {val_before:.4f} -> {val_loss:.4f}  (outputs in {out})")
    return summary
