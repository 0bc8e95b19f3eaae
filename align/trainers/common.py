"""Pieces every trainer shares: seeding, the optimizer and schedule, a resumable batch order,
the run directory."""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import numpy as np
import torch

from align.config import TrainerConfig

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_threads(num_threads: int) -> None:
    """0 keeps torch's default; a fixed count makes CPU float sums repeatable across runs."""
    if num_threads:
        torch.set_num_threads(num_threads)


def build_optimizer(params: Iterable[torch.nn.Parameter] | Iterable[tuple[str, torch.nn.Parameter]],
                    cfg: TrainerConfig) -> torch.optim.Optimizer:
    """`cfg.optimizer`: AdamW, whose weight decay skips biases and norm weights (1-D tensors), as
    is usual for LMs; or plain SGD at `cfg.lr`."""
    named = list(params)
    if named and not isinstance(named[0], tuple):
        named = [(str(i), p) for i, p in enumerate(named)]
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("no trainable parameters: check model.finetune / the LoRA target modules")
    decay = [p for _, p in named if p.ndim >= 2]
    no_decay = [p for _, p in named if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainerConfig):
    """Linear warm-up, then cosine (down to `min_lr_ratio` of the peak), linear (to zero) or constant."""
    from transformers import get_scheduler

    name, extra = {
        "cosine": ("cosine_with_min_lr", {"min_lr_rate": cfg.min_lr_ratio}),
        "linear": ("linear", {}),
        "constant": ("constant_with_warmup", {}),
    }[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=cfg.max_steps, scheduler_specific_kwargs=extra)


class EpochBatches:
    """A deterministic, resumable order of mini-batches over `n` examples.

    Epoch e visits a permutation drawn from a generator seeded with `seed + e`, in batches of
    `batch_size` (the last partial batch is dropped so every step sees the same count). The
    position (epoch, cursor) is all the state there is: it goes into checkpoints.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n < batch_size:
            raise ValueError(f"{n} training examples is fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> list[int]:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + self.epoch)
                self._perm = torch.randperm(self.n, generator=g).tolist()
            else:
                self._perm = list(range(self.n))
            self._perm_epoch = self.epoch
        return self._perm

    def next(self) -> list[int]:
        if self.cursor + self.batch_size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
        idx = self._permutation()[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def prepare_output_dir(output_dir: str, run_cfg, hydra_cfg=None) -> Path:
    """Create the run directory and write the resolved config (YAML and JSON) into it (rank 0 of
    data-parallel replicas; the others wait for it)."""
    from align.engine import distributed

    out = Path(output_dir)
    if not distributed.is_main():
        distributed.barrier()
        return out
    out.mkdir(parents=True, exist_ok=True)
    if hydra_cfg is not None:
        from omegaconf import OmegaConf

        resolved = OmegaConf.to_container(hydra_cfg, resolve=True)
        resolved.pop("hydra", None)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    (out / "config.json").write_text(json.dumps(asdict(run_cfg), indent=1, default=str))
    distributed.barrier()
    return out


def save_final(engine, model, tokenizer, path: Path) -> bool:
    """Rank 0 writes the trained model (or its adapter) with the tokenizer to `path`; every
    replica enters (sharded weights are gathered). Returns whether this process wrote it."""
    from align.engine import distributed

    with engine.gathered(model):
        if distributed.is_main():
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
    return distributed.is_main()


def cpu_count_hint() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def replica_micro_batches(batches: list[list[T]], max_tokens: int | None, length: Callable[[T], int]) -> list[list[T]]:
    """This data-parallel replica's micro-batches of one optimizer step: its share of each of the
    step's `batches` (the same draws on every replica, `align.engine.distributed.shard_range`),
    cut as `step_micro_batches` does. Under token budgets the replicas agree on one count (the
    largest any needs: ddp's and fsdp2's backward hooks run every replica's units in step), as veRL does."""
    from align.engine import distributed

    mine = [[b[i] for i in distributed.shard_range(len(b))] for b in batches]
    micro = step_micro_batches(mine, max_tokens, length)
    if max_tokens is None or distributed.world_size() == 1:
        return micro
    count = distributed.all_max(len(micro))
    if count > len(micro):
        micro = step_micro_batches(mine, max_tokens, length, min_count=count)
        if len(micro) < count:
            raise ValueError(f"trainer.max_tokens_per_micro={max_tokens}: another replica needs {count} micro-batches "
                             f"for its share of the step, more than this one's {sum(map(len, mine))} examples; "
                             "raise the budget or trainer.batch_size")
    return micro


def step_micro_batches(batches: list[list[T]], max_tokens: int | None, length: Callable[[T], int],
                       min_count: int = 1) -> list[list[T]]:
    """The items of one optimizer step, as micro-batches.

    batches: the step's `grad_accum` batches of `batch_size` items (the data order's draws).
    max_tokens: null keeps them as they are (row-count micro-batches); a number
        (`trainer.max_tokens_per_micro`) re-cuts all the step's items into micro-batches of at
        most that many tokens, `length(item)` each (align/data/packing.py
        `token_budget_micro_batches`), for padding-free passes. Empty ones are left out.
    """
    if max_tokens is None:
        return batches
    from align.data.packing import token_budget_micro_batches

    items = [x for batch in batches for x in batch]
    cuts = token_budget_micro_batches([length(x) for x in items], max_tokens, min_count)
    return [[items[i] for i in rows] for rows in cuts if rows]
