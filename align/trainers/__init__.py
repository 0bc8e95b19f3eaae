"""One driver per algorithm; `run` dispatches on `algo.name` and imports only that driver."""

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


def run(cfg, hydra_cfg=None):
    """Run the trainer named by `cfg.algo.name`; returns its summary dict."""
    name = cfg.algo.name
    if name not in TRAINERS:
        raise ValueError(f"algo.name: unknown algorithm {name!r}; valid: {sorted(TRAINERS)}")
    return importlib.import_module(TRAINERS[name]).train(cfg, hydra_cfg)
