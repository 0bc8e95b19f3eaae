"""Crash safety of the RL drivers: exact resume after the driver is SIGKILLed, and a clear error
(with the last checkpoint intact) when a worker dies."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from _resume import check_sigkill_resume

from align.config import compose

# Tiny runs with LoRA dropout on, so every step's dropout masks depend on each worker's RNG.
# GRPO: KL-in-loss against the reference. PPO covers the most state: actor and critic adapters,
# two optimizers, the adaptive KL coefficient and recomputed old log-probs (2 epochs x 2
# minibatches).
COMMON = ["model.lora.dropout=0.1", "algo.rollout_batch_size=2", "algo.num_generations=4", "algo.eval_prompts=2",
          "rollout.max_new_tokens=10", "trainer.eval_every=2", "trainer.progress=false", "seed=3"]
TINY = {
    "grpo": ["algo=grpo", *COMMON],
    "ppo": ["algo=ppo", *COMMON, "algo.kl_controller=adaptive", "algo.kl_horizon=100", "algo.minibatch_size=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("algo", sorted(TINY))
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(ray_cluster, tmp_path, algo):
    """A driver SIGKILLed right after its step-2 checkpoint and rerun with the same command redoes
    steps 3-7 exactly as an uninterrupted run does (every metric but wall times, and the final
    adapters), with one metrics row per step: the driver's and each worker's RNG, the data
    position, the adapters and optimizer states all come back (tests/_resume.py)."""
    rows = check_sigkill_resume([*TINY[algo], f"cluster.address={ray_cluster}"], tmp_path, max_steps=7, save_every=2)
    assert all(rows[step]["actor/grad_norm"] > 0 for step in range(5, 8))  # the redone steps learned
    if algo == "ppo":
        assert rows[7]["kl/coef"] != 0.02  # the adaptive coefficient moved and was restored, not reset


@pytest.mark.slow
def test_dead_worker_names_itself_and_leaves_the_checkpoint_intact(ray_cluster, tmp_path):
    """Kill the worker process (SIGKILL) once a checkpoint exists: the driver raises an error
    naming the worker, its pid, its log and the intact last checkpoint, and that checkpoint loads."""
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
    assert f"its log {worker['log']} (no crash report in it)" in message  # SIGKILL prints nothing
    assert f"the last checkpoint, {latest}, is intact" in message
    state = json.loads((latest / STATE).read_text())
    assert state["step"] >= 1
    adapter = load_file(str(latest / "workers" / "model" / "actor" / "adapter_model.safetensors"))
    assert adapter and all(t.isfinite().all() for t in adapter.values())
