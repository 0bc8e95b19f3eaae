"""Crash safety of the RL drivers: exact resume after the driver is SIGKILLed, and a clear error
(with the last checkpoint intact) when a worker dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from align.config import REPO_ROOT, compose

# PPO covers the most state: actor and critic adapters, two optimizers, the adaptive KL
# coefficient, the prompt order, and recomputed old log-probs (2 epochs x 2 minibatches).
PPO_TINY = [
    "algo=ppo", "algo.kl_controller=adaptive", "algo.kl_horizon=100", "algo.rollout_batch_size=2",
    "algo.num_generations=4", "algo.minibatch_size=4", "algo.eval_prompts=4", "rollout.max_new_tokens=12",
    "trainer.max_steps=5", "trainer.save_every=2", "trainer.eval_every=2", "trainer.progress=false", "seed=3",
]


def _rows(path: Path) -> dict[int, dict]:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line being written
                continue
            out[row["step"]] = row
    return out


def _without_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "time" and not k.startswith("time/")}


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_the_metrics(ray_cluster, tmp_path):
    """Run 1 is SIGKILLed right after step 3 is logged (checkpoints at steps 2 and 4). Run 2, the
    same command, resumes from step 2 and redoes step 3: every metric but wall times must equal
    run 1's, and the run must finish all 5 steps with one row per step."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "align", *PPO_TINY, f"output_dir={out}", f"cluster.address={ray_cluster}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 420
    while 3 not in _rows(out / "metrics.jsonl"):
        if first.poll() is not None:
            pytest.fail(f"run 1 exited early ({first.returncode}): {first.stderr.read().decode()[-2000:]}")
        assert time.time() < deadline, "run 1 never reached step 3"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    before = _rows(out / "metrics.jsonl")
    assert (out / "checkpoints" / "latest").read_text() == "step_2", "the kill came too late to test resume"

    second = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    after = _rows(out / "metrics.jsonl")
    assert sorted(after) == [0, 1, 2, 3, 4, 5]
    for step in (0, 1, 2, 3):
        assert _without_times(after[step]) == _without_times(before[step]), f"step {step} differs after resume"
    assert after[3]["kl/coef"] != 0.02  # the adaptive coefficient moved and was restored, not reset


@pytest.mark.slow
def test_dead_worker_names_itself_and_leaves_the_checkpoint_intact(ray_cluster, tmp_path):
    """Kill the worker process (SIGKILL) once a checkpoint exists: the driver raises an error
    naming the worker, its pid and the intact last checkpoint, and that checkpoint loads."""
    from safetensors.torch import load_file

    from align.trainers.checkpoint import STATE, Checkpointer
    from align.trainers.grpo import train
    from align.workers.group import WorkerDiedError

    cfg, hydra_cfg = compose(["algo=grpo", f"output_dir={tmp_path}", "trainer.max_steps=200", "trainer.save_every=1",
                              "trainer.eval_every=100", "trainer.progress=false", "algo.rollout_batch_size=2",
                              "algo.num_generations=4", "algo.eval_prompts=2", "rollout.max_new_tokens=12"])
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(train, cfg, hydra_cfg)
        deadline = time.time() + 300
        while not (tmp_path / "checkpoints" / "latest").exists():
            assert not run.done(), run.exception()
            assert time.time() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        worker = json.loads((tmp_path / "workers.json").read_text())[0]
        os.kill(worker["pid"], signal.SIGKILL)
        with pytest.raises(WorkerDiedError) as err:
            run.result(timeout=300)

    message = str(err.value)
    latest = Checkpointer(tmp_path).latest()
    assert latest is not None
    assert "model-0" in message and str(worker["pid"]) in message and "died" in message
    assert f"the last checkpoint, {latest}, is intact" in message
    state = json.loads((latest / STATE).read_text())
    assert state["step"] >= 1
    adapter = load_file(str(latest / "workers" / "model" / "actor" / "adapter_model.safetensors"))
    assert adapter and all(t.isfinite().all() for t in adapter.values())
