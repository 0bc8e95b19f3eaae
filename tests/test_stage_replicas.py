"""SFT, RM, DPO and KTO on 2 data-parallel replicas (ddp and fsdp2, gloo on CPU) train exactly
as 1 replica on the whole batch: the same logged losses at every step and the same weights
after it, with LoRA and with full fine-tuning; checkpoints resume under another replica count;
`python -m align ... cluster.num_replicas=2` runs the replicas as Ray workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.config import compose
from align.trainers import run
from align.trainers.checkpoint import read_trainable
from align.trainers.metrics import read_metrics
from tests._dist import run_replicas

COMMON = [
    "data.limit=48", "data.val_size=8", "data.max_length=96", "data.max_prompt_length=64",
    "data.max_response_length=32", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.eval_batches=2",
    "trainer.progress=false", "trainer.num_threads=1", "trainer.warmup_steps=0", "trainer.max_steps=3",
    "trainer.save_every=3", "trainer.eval_every=3", "trainer.check_memory=off", "trainer.loggers=[jsonl]",
    # SGD: a step is lr x the gradient, so equal weights mean equal gradients (Adam's first step is ~sign(g))
    "trainer.optimizer=sgd", "trainer.lr=0.5",
]
STAGES = {
    "sft": ["algo=sft"],
    "rm": ["algo=rm"],
    "dpo": ["algo=dpo", "algo.reference_cache=false"],
    "kto": ["algo=kto", "algo.reference_cache=false"],
}
LOSS_KEYS = ("loss", "val_loss", "val/loss", "accuracy", "rewards/margins", "val/rewards/margins", "grad_norm")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _single(out: Path, overrides: list[str]) -> None:
    cfg, raw = compose([*COMMON, *overrides, f"output_dir={out}"])
    run(cfg, raw)


def _weights(out: Path, step: int) -> dict:
    return read_trainable(out / "checkpoints" / f"step_{step}")  # whole, from either format


def _assert_same_run(a: Path, b: Path, step: int, tol: float = 1e-5, weight_tol: float = 1e-5) -> None:
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    compared = 0
    for ra, rb in zip(rows_a, rows_b):
        for k in LOSS_KEYS:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=tol, abs=tol), (ra["step"], k)
                compared += 1
    assert compared >= 4
    wa, wb = _weights(a, step), _weights(b, step)
    assert sorted(wa) == sorted(wb) and wa
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=0, atol=weight_tol, msg=name)


@pytest.mark.parametrize("stage,finetune,strategy", [
    ("sft", "full", "fsdp2"),
    ("sft", "lora", "ddp"),
    ("rm", "lora", "fsdp2"),
    ("rm", "full", "ddp"),
    ("dpo", "lora", "fsdp2"),
    ("dpo", "full", "fsdp2"),
    ("dpo", "lora", "ddp"),
    ("kto", "lora", "fsdp2"),
    ("sft", "lora", "hsdp"),  # fsdp2 over a 2 x 1 mesh: shards of one replica, replicated twice
])
def test_two_replicas_equal_one_on_the_whole_batch(tmp_path, one_thread, stage, finetune, strategy):
    model = ["model=stories260k_lora"] if finetune == "lora" else ["model.finetune=full"]
    overrides = [*STAGES[stage], *model]
    _single(tmp_path / "one", overrides)
    sharding = ["trainer.strategy=fsdp2", "trainer.fsdp_shard_size=1"] if strategy == "hsdp" else [f"trainer.strategy={strategy}"]
    run_replicas([*COMMON, *overrides, *sharding, "cluster.num_replicas=2", f"output_dir={tmp_path / 'two'}"])
    _assert_same_run(tmp_path / "one", tmp_path / "two", step=3)
    # rank 0 alone wrote the outputs, and the exported model loads
    assert (tmp_path / "two" / "summary.json").exists()
    assert len(read_metrics(tmp_path / "two")) == len(read_metrics(tmp_path / "one"))


@pytest.mark.parametrize("strategy", ["fsdp2", "ddp"])
def test_bf16_mixed_replicas_track_fp32(tmp_path, one_thread, strategy):
    # Under fsdp2 and ddp, bf16-mixed is FSDP2's policy (bf16 gathered parameters, fp32 masters, fp32
    # reductions): its losses track the fp32 run's within 2% over 6 steps, and it trains.
    overrides = ["algo=sft", "model.finetune=full", "trainer.max_steps=6", "trainer.save_every=6", "trainer.eval_every=6",
                 "trainer.optimizer=adamw", "trainer.lr=2e-3"]
    _single(tmp_path / "fp32", overrides)
    run_replicas([*COMMON, *overrides, "trainer.precision=bf16-mixed", f"trainer.strategy={strategy}",
                  "cluster.num_replicas=2", f"output_dir={tmp_path / 'bf16'}"])
    fp32, bf16 = ([r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r] for d in ("fp32", "bf16"))
    assert len(fp32) == len(bf16) == 6
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=2e-2)
    assert bf16 != fp32  # it did compute in bf16
    weights = _weights(tmp_path / "bf16", 6)
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights saved


def test_fsdp2_checkpoint_is_sharded_and_resumes_on_one_or_two_replicas(tmp_path, one_thread):
    # 2 fsdp2 replicas train steps 1-2 and checkpoint with DCP: each writes its own shards, no
    # process gathers the whole weights or optimizer. Resumed by one process (no process group)
    # and by 2 replicas to step 4: both the same as one process all along.
    import shutil

    overrides = ["algo=sft", "model.finetune=full", "trainer.max_steps=4", "trainer.save_every=2",
                 "trainer.eval_every=2", "trainer.optimizer=adamw", "trainer.lr=1e-3",
                 "trainer.lr_scheduler=constant"]  # the first run stops at 2 of 4 steps: no schedule to differ
    _single(tmp_path / "one", overrides)
    two = tmp_path / "two"
    run_replicas([*COMMON, *overrides, "trainer.max_steps=2", "trainer.strategy=fsdp2", "cluster.num_replicas=2",
                  f"output_dir={two}"])
    step2 = two / "checkpoints" / "step_2"
    assert json.loads((step2 / "trainer_state.json").read_text())["step"] == 2
    shards = sorted(f.name for f in (step2 / "sharded").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and not (step2 / "trainable.safetensors").exists()
    whole = sum(t.numel() * t.element_size() for t in read_trainable(step2).values())
    for f in (step2 / "sharded").glob("*.distcp"):  # weights + AdamW's 2 moments, about half each
        assert 0.35 * 3 * whole < f.stat().st_size < 0.65 * 3 * whole, f.name
    again = tmp_path / "two_again"
    shutil.copytree(two, again)
    _single(two, overrides)  # resume=auto: continues from step 2, one process, unsharded
    run_replicas([*COMMON, *overrides, "trainer.strategy=fsdp2", "cluster.num_replicas=2", f"output_dir={again}"])
    for resumed in (two, again):
        _assert_same_run(tmp_path / "one", resumed, step=4, weight_tol=1e-5)
    # the optimizer state came through the sharded checkpoint: AdamW's moments and step counts
    ours, theirs = (torch.load(d / "checkpoints" / "step_4" / "optimizer.pt", weights_only=True)["policy"]["state"]
                    for d in (two, tmp_path / "one"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert float(ours[name]["step"]) == float(theirs[name]["step"]) == 4
        torch.testing.assert_close(ours[name]["exp_avg_sq"], theirs[name]["exp_avg_sq"], rtol=1e-3, atol=1e-12)


def test_replicas_through_ray_from_the_command_line(tmp_path):
    # The user's command: Ray starts 2 workers, each an fsdp2 replica; rank 0 writes the run.
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "align", "algo=sft", *COMMON, "trainer.strategy=fsdp2", "cluster.num_replicas=2",
           f"output_dir={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sft done on 2 replicas (fsdp2)" in proc.stdout
    _single(tmp_path / "one", ["algo=sft"])
    _assert_same_run(tmp_path / "one", out, step=3)
    assert (out / "final" / "model.safetensors").exists()
