"""A worker checkpoint restores each replica's own RNG streams (LoRA dropout draws from them);
the end-to-end SIGKILL tests are in tests/trainers/rl/test_rl_resume.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from align.config import LoraConfig, ModelConfig, TrainerConfig
from align.workers.worker import RNG_FILE, TORCH_RNG_FILE, ModelWorker, WorkerSpec


def _draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def test_each_replica_saves_and_restores_its_own_rng(stories_path, tmp_path, monkeypatch):
    """Two replicas of one group save into one folder, each from its own RNG state (one process
    stands in for both, so each is seeded just before it saves); after the streams move on,
    `load` puts each replica back on its own stream. A replica whose files are missing warns,
    naming the file, and keeps its RNG. (With no process group to fill it from rank 0, replica 1
    builds its model for real rather than on the meta device.)"""
    from align.engine import TrainEngine

    monkeypatch.setattr(TrainEngine, "init_on_meta", staticmethod(lambda *args: False))
    spec = WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune="lora", lora=LoraConfig(dropout=0.1)),
                      trainer=TrainerConfig(strategy="ddp"), roles=("actor",))
    replicas = [ModelWorker(spec, rank=rank, world_size=2) for rank in (0, 1)]
    expected = {}
    for w in replicas:
        torch.manual_seed(100 + w.rank)
        random.seed(200 + w.rank)
        np.random.seed(300 + w.rank)
        w.save(str(tmp_path))
        expected[w.rank] = _draws()
    assert expected[0] != expected[1]
    assert (tmp_path / "optimizer.pt").exists()  # rank 0 wrote the shared state once
    for w in reversed(replicas):
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        w.load(str(tmp_path))
        assert _draws() == expected[w.rank], f"rank {w.rank} did not get its own RNG back"

    (tmp_path / RNG_FILE.format(rank=1)).unlink()
    (tmp_path / TORCH_RNG_FILE.format(rank=1)).unlink()
    unchanged = torch.rand(1, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    with pytest.warns(UserWarning, match="rng_rank1.json not found"):
        replicas[1].load(str(tmp_path))
    assert torch.equal(torch.rand(1), unchanged)
