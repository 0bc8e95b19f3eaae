"""Checkpoints: atomic writes, pruning, RNG and data position round trips."""

import json
import random

import numpy as np
import pytest
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


def test_sharded_format_round_trips_in_one_process(tmp_path):
    # What replicas write (DCP, keyed by name) reads back into a fresh model and optimizer in a
    # process without a process group: the next steps are the uninterrupted run's.
    from align.trainers.checkpoint import load_sharded, read_trainable, save_sharded

    model, opt, sched = _parts()
    for _ in range(2):
        _step(model, opt, sched)
    save_sharded(tmp_path, model, {"p": opt})
    schedule = sched.state_dict()
    torch.manual_seed(7)
    expected = [_step(model, opt, sched) for _ in range(2)]

    fresh, fopt, fsched = _parts(seed=123)  # different init: everything must come from the files
    load_sharded(tmp_path, fresh, {"p": fopt})
    fsched.load_state_dict(schedule)
    assert float(fopt.state[fresh[0].weight]["step"]) == 2
    saved = read_trainable(tmp_path)
    assert sorted(saved) == sorted(n for n, _ in fresh.named_parameters())
    for n, p in fresh.named_parameters():
        torch.testing.assert_close(p.detach(), saved[n])
    torch.manual_seed(7)
    got = [_step(fresh, fopt, fsched) for _ in range(2)]
    assert got == pytest.approx(expected, rel=1e-6)


def test_sharded_metadata_that_is_not_dcp_is_refused(tmp_path):
    # DCP's .metadata index is a pickle: ours admits its metadata classes only, so a crafted file
    # cannot run code when a checkpoint is resumed.
    import os
    import pickle

    from align.trainers.checkpoint import SHARDED, read_trainable

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / SHARDED).mkdir()
    (tmp_path / SHARDED / ".metadata").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        read_trainable(tmp_path)
    assert not (tmp_path / "pwned").exists()
