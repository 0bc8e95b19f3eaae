"""One driver per algorithm; `run` dispatches on `algo.name` and imports only that driver.

SFT, RM and DPO/KTO with `cluster.num_replicas > 1` run on that many Ray workers, each running
the same driver on its share of every step (`align.engine.spmd`)."""

from __future__ import annotations

import importlib

TRAINERS = {
    "sft": "align.trainers.sft",
    "quantize": "align.quantize",
    "grpo": "align.trainers.grpo",
    "ppo": "align.trainers.ppo",
    "dpo": "align.trainers.dpo",
    "rm": "align.trainers.rm",
    "pipeline": "align.pipeline",
    "eval": "align.evaluation",
}
# Stages that run as N copies of their in-process driver (align/engine/spmd.py).
SPMD_STAGES = ("sft", "rm", "dpo")


def run(cfg, hydra_cfg=None):
    """Run the trainer named by `cfg.algo.name`; returns its summary dict."""
    name = cfg.algo.name
    if name not in TRAINERS:
        raise ValueError(f"algo.name: unknown algorithm {name!r}; valid: {sorted(TRAINERS)}")
    if name in SPMD_STAGES and cfg.cluster.num_replicas > 1:
        from align.engine import distributed

        if distributed.world_size() == 1:  # the launching process: start the replicas
            from align.engine.spmd import run_replicated

            return run_replicated(cfg, hydra_cfg)
    return importlib.import_module(TRAINERS[name]).train(cfg, hydra_cfg)
