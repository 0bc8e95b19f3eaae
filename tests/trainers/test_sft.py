"""SFT end to end on the shipped stories260K and HH-RLHF: learning, gradient accumulation,
outputs on disk, and exact resume after SIGKILL."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from align.config import compose
from align.trainers import run
from align.trainers.metrics import read_metrics

SMALL = [
    "data.limit=160", "data.val_size=16", "data.max_length=96", "data.max_prompt_length=64",
    "data.max_response_length=32", "trainer.batch_size=4", "trainer.eval_batches=4",
    "trainer.progress=false", "trainer.num_threads=1", "trainer.warmup_steps=2",
]


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(tmp_path, *overrides):
    cfg, raw = compose([*SMALL, f"output_dir={tmp_path}", *overrides])
    return run(cfg, raw)


def test_sft_lowers_validation_loss_and_writes_run_outputs(tmp_path, one_thread):
    summary = _run(tmp_path, "trainer.max_steps=30", "trainer.eval_every=30", "trainer.save_every=30",
                   "trainer.lr=1e-3")
    before, after = summary["val_loss_before"], summary["val_loss_after"]
    assert after < before - 0.2, (before, after)
    # one output directory holds the resolved config, metrics, TensorBoard events, checkpoints
    assert (tmp_path / "config.yaml").read_text().count("stories260K") >= 1
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 31))
    # seconds from the start of train() to the end of step 1 (loading, step-0 evaluation), logged once
    assert [r["step"] for r in rows if "time_to_first_step" in r] == [1]
    assert rows[1]["time_to_first_step"] >= rows[1]["time"] > 0
    assert rows[0]["step"] == 0 and rows[0]["val_loss"] == pytest.approx(before)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "step_30" / "trainable.safetensors").exists()
    # the final model reloads with from_pretrained and scores the same as in training
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert sum(p.numel() for p in reloaded.parameters()) > 200_000
    assert summary["data"]["examples_tokenized"] == summary["train_examples"] + summary["val_examples"]


def test_lora_sft_trains_only_the_adapter(tmp_path, one_thread):
    summary = _run(tmp_path, "model=stories260k_lora", "trainer.max_steps=20", "trainer.eval_every=20",
                   "trainer.save_every=20", "trainer.lr=1e-2")
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05
    assert (tmp_path / "final" / "adapter_config.json").exists()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "step_20" / "trainable.safetensors"))
    assert saved and all("lora_" in name for name in saved)


def test_grad_accumulation_2x4_equals_1x8(tmp_path, one_thread):
    """Normalising by the whole step's response tokens makes 2 micro-batches of 4 give the same
    update as one batch of 8 (the same 8 examples: the epoch permutation does not depend on the
    batch size). Plain SGD, so the weights compare gradients: Adam's first step is nearly
    lr x sign(g), blind to a wrong normaliser and unstable on gradients near its eps."""
    weights = {}
    for bs, ga in [(8, 1), (4, 2)]:
        out = tmp_path / f"bs{bs}"
        _run(out, "trainer.max_steps=1", f"trainer.batch_size={bs}", f"trainer.grad_accum={ga}",
             "trainer.max_grad_norm=0", "trainer.warmup_steps=0", "trainer.lr_scheduler=constant",
             "trainer.optimizer=sgd", "trainer.lr=0.5")
        from safetensors.torch import load_file

        weights[bs] = load_file(str(out / "checkpoints" / "step_1" / "trainable.safetensors"))
    initial = {n: p for n, p in _initial_weights().items()}
    moved = max(float((weights[8][n] - initial[n]).abs().max()) for n in weights[8] if n in initial)
    assert moved > 1e-4  # the step did change the weights
    for name in weights[8]:
        torch.testing.assert_close(weights[4][name], weights[8][name], atol=2e-6, rtol=1e-5)


def _initial_weights():
    from align.config import shared_data_dir
    from align.models.loading import load_causal_lm

    model = load_causal_lm(f"{shared_data_dir()}/models/stories260K")
    return {n: p.detach() for n, p in model.named_parameters()}


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path, one_thread):
    steps = ["trainer.max_steps=16", "trainer.save_every=4", "trainer.eval_every=8", "trainer.lr=1e-3"]
    _run(tmp_path / "whole", *steps)
    expected = {r["step"]: r for r in read_metrics(tmp_path / "whole")}

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "align", *SMALL, *steps, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    killed_at = None
    try:
        while time.time() < deadline and proc.poll() is None:
            latest = out / "checkpoints" / "latest"
            if latest.exists() and (out / "metrics.jsonl").exists():
                done = [r["step"] for r in read_metrics(out) if "loss" in r]
                if done and done[-1] >= 5:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed_at = done[-1]
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert killed_at is not None and killed_at < 16, "the run finished before it could be killed"
    ckpt = (out / "checkpoints" / "latest").read_text()
    assert int(ckpt.split("_")[1]) <= killed_at

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    got = {r["step"]: r for r in read_metrics(out)}
    assert sorted(got) == sorted(expected)
    for step, row in expected.items():
        for key in ("loss", "val_loss", "lr", "grad_norm"):
            if key in row:
                assert got[step][key] == pytest.approx(row[key], rel=1e-6, abs=1e-7), (step, key)
