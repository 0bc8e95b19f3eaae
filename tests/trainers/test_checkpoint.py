"""Checkpoints: atomic writes, pruning, RNG and data position round trips."""

import json
import random

import numpy as np
import torch

from align.trainers.checkpoint import Checkpointer
from align.trainers.common import EpochBatches


def _parts(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _step(model, opt, sched):
    loss = model(torch.randn(3, 4)).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return float(loss)


def test_round_trip_restores_weights_optimizer_schedule_and_rng(tmp_path):
    model, opt, sched = _parts()
    for _ in range(3):
        _step(model, opt, sched)
    ck = Checkpointer(tmp_path)
    ck.save(3, model=model, optimizers={"p": opt}, schedulers={"p": sched}, trainer_state={"data": {"epoch": 1}})
    expected = [_step(model, opt, sched) for _ in range(3)] + [random.random(), float(np.random.rand())]

    fresh, fopt, fsched = _parts(seed=123)  # different init: everything must come from the file
    state, _ = ck.load(ck.latest(), model=fresh, optimizers={"p": fopt}, schedulers={"p": fsched})
    assert state == {"step": 3, "data": {"epoch": 1}}
    got = [_step(fresh, fopt, fsched) for _ in range(3)] + [random.random(), float(np.random.rand())]
    assert got == expected


def test_torn_write_leaves_previous_checkpoint_and_prunes(tmp_path):
    model, opt, sched = _parts()
    ck = Checkpointer(tmp_path, keep=2)
    for step in (1, 2, 3):
        ck.save(step, model=model, optimizers={"p": opt}, schedulers={"p": sched}, trainer_state={})
    names = sorted(p.name for p in ck.root.glob("step_*"))
    assert names == ["step_2", "step_3"]
    # a crash mid-save leaves a temp folder and no pointer update: latest is still step_3
    (ck.root / ".tmp_step_4").mkdir()
    (ck.root / ".tmp_step_4" / "trainable.safetensors").write_bytes(b"partial")
    assert ck.latest().name == "step_3"
    # a dangling pointer (folder pruned by hand) falls back to the newest complete one
    (ck.root / "latest").write_text("step_9")
    assert ck.latest().name == "step_3"
    assert json.loads((ck.latest() / "trainer_state.json").read_text())["step"] == 3


def test_epoch_batches_resume_mid_epoch_gives_same_order():
    a = EpochBatches(10, 3, seed=5)
    seen = [a.next() for _ in range(4)]  # crosses into epoch 1 (3 full batches per epoch)
    assert a.epoch == 1
    b = EpochBatches(10, 3, seed=5)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]
    # every epoch is a permutation: no example twice within one epoch
    c = EpochBatches(9, 3, seed=0)
    epoch0 = sum((c.next() for _ in range(3)), [])
    assert sorted(epoch0) == list(range(9))
    assert seen[0] != seen[3]
