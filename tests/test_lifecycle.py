"""Nothing of ours outlives a run (align/lifecycle.py): a SIGKILLed RL driver leaves no process
of its Ray behind, and SIGTERM stops a run after the step in flight with a checkpoint that the
rerun resumes from.

The drivers run as `python -m align` in process sessions of their own: Ray's daemons, agents and
workers keep the driver's session id, so that id names exactly the processes of the run
(tests/_session.py), independently of how the watchdog finds them (the Ray session directory).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _session import kill_session, session_pids

from align.config import REPO_ROOT, TrainerConfig
from align.lifecycle import RunStopped, save_or_stop, stop_on_signals

GRPO_TINY = ["algo=grpo", "algo.rollout_batch_size=2", "algo.num_generations=2", "rollout.max_new_tokens=8",
             "algo.eval_prompts=2", "trainer.progress=false"]  # no cluster.address: the driver starts its own Ray
SFT_SMALL = ["data.limit=160", "data.val_size=16", "data.max_length=96", "data.max_prompt_length=64",
             "data.max_response_length=32", "trainer.batch_size=4", "trainer.eval_batches=4", "trainer.progress=false",
             "trainer.num_threads=1", "trainer.warmup_steps=2"]
# The design target for SIGTERM to exit is 10 s (3.7 s measured for GRPO with the 2 cores loaded);
# the bound is looser so that a loaded CI machine does not fail a run that does stop.
EXIT_BOUND_S = 30
# Without the watchdog Ray's two agents outlive a SIGKILLed driver by 60-70 s (seen every time).
ORPHAN_BOUND_S = 30


def _steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line)["step"])
        except json.JSONDecodeError:  # a line being written
            continue
    return rows


def _start(overrides: list[str], out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "align", *overrides, f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f,
                                start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, log: Path, step: int, timeout_s: float = 420) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(s >= step for s in _steps(out)):
        if proc.poll() is not None:
            pytest.fail(f"the run exited early ({proc.returncode}):\n{log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"the run never logged step {step}"
        time.sleep(0.1)


def _wait_until_gone(sid: int, timeout_s: float) -> list[int]:
    """The processes of session `sid` still alive after up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.25)
    return session_pids(sid)


def _names(pids: list[int]) -> list[str]:
    """The programs of `pids`: `raylet`, `gcs_server`, `dashboard.py`, `ray::DashboardAgent`..."""
    names = []
    for pid in pids:
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        program = [a for a in args[1:] if a.endswith(".py")][:1] if "python" in args[0] else []
        names.append(os.path.basename((program or args)[0]))
    return names


# ---- save_or_stop and the handlers, in this process ---------------------------------------------
def test_after_a_stop_signal_the_step_is_checkpointed_and_the_run_stops():
    tcfg = TrainerConfig(max_steps=10, save_every=4)
    saved = []

    def save(step):
        saved.append(step)
        return Path(f"ckpt/step_{step}")

    with stop_on_signals():
        save_or_stop(3, tcfg, lambda: save(3))  # no signal: not due, no checkpoint
        save_or_stop(4, tcfg, lambda: save(4))  # due
        assert saved == [4]
        signal.raise_signal(signal.SIGTERM)  # the handler only sets the flag
        with pytest.raises(RunStopped) as stop:
            save_or_stop(5, tcfg, lambda: save(5))
        assert saved == [4, 5]
        assert (stop.value.step, stop.value.checkpoint, stop.value.exit_code) == (5, Path("ckpt/step_5"), 143)
        assert str(stop.value).startswith("stopped by SIGTERM at step 5; checkpoint at ckpt/step_5")
        save_or_stop(10, tcfg, lambda: save(10))  # the last step ends the run as usual
    assert saved == [4, 5, 10]
    save_or_stop(6, tcfg, lambda: save(6))  # outside, the flag is cleared: nothing due, no stop
    assert saved == [4, 5, 10]


def test_a_second_signal_exits_at_once():
    script = ("import os, signal, time\n"
              "from align.lifecycle import stop_on_signals, stop_requested\n"
              "with stop_on_signals():\n"
              "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.2)\n"
              "    print('requested', stop_requested(), flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGINT); time.sleep(30)\n"
              "    print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[0] == "requested True" and "still running" not in done.stdout
    assert done.returncode == 128 + signal.SIGINT
    assert "second SIGINT: exiting now" in done.stderr


# ---- real runs ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sigkilled_grpo_driver_leaves_no_process_of_its_ray(tmp_path):
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    proc = _start([*GRPO_TINY, "trainer.max_steps=200"], out, log)
    try:
        _wait_for_step(proc, out, log, 1)
        ray_pids = [p for p in session_pids(proc.pid) if p != proc.pid]
        assert "raylet" in _names(ray_pids), _names(ray_pids)  # it runs its own Ray
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = _wait_until_gone(proc.pid, ORPHAN_BOUND_S)
        assert not left, f"left {ORPHAN_BOUND_S} s after the driver's SIGKILL: {_names(left)}"
        # the watchdog says what it ended, once its SIGTERM/SIGKILL rounds are over (the processes may
        # be gone a moment before it writes)
        deadline = time.monotonic() + 20
        while "which died without shutting its Ray down" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "which died without shutting its Ray down" in log.read_text()
    finally:
        kill_session(proc.pid)


def _sigterm_and_rerun(overrides: list[str], tmp_path: Path, max_steps: int) -> None:
    """SIGTERM the run once it logged step 1: it exits 143 within the bound, naming the step it
    reached and its checkpoint; nothing of its session is left; the same command resumes there
    and finishes every step once."""
    out, log = tmp_path / "run", tmp_path / "stderr.log"
    overrides = [*overrides, f"trainer.max_steps={max_steps}", "trainer.save_every=1000", "trainer.eval_every=1000"]
    proc = _start(overrides, out, log)
    try:
        _wait_for_step(proc, out, log, 1)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {EXIT_BOUND_S} s after SIGTERM:\n{log.read_text()[-3000:]}")
        assert not _wait_until_gone(proc.pid, 10), _names(session_pids(proc.pid))
    finally:
        kill_session(proc.pid)
    stderr = log.read_text()
    reached = max(_steps(out))
    assert proc.returncode == 143, stderr[-3000:]
    assert 1 <= reached < max_steps, "the run ended before SIGTERM could stop it"
    checkpoint = out / "checkpoints" / f"step_{reached}"
    assert f"stopped by SIGTERM at step {reached}; checkpoint at {checkpoint}" in stderr
    assert (out / "checkpoints" / "latest").read_text() == checkpoint.name
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == reached

    rerun = subprocess.run([sys.executable, "-m", "align", *overrides, f"output_dir={out}"], cwd=REPO_ROOT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {checkpoint} at step {reached}" in rerun.stderr
    assert _steps(out) == list(range(max_steps + 1))


@pytest.mark.slow
def test_sigterm_stops_grpo_after_the_step_with_a_checkpoint_the_rerun_resumes(tmp_path):
    _sigterm_and_rerun(GRPO_TINY, tmp_path, max_steps=6)


@pytest.mark.slow
def test_sigterm_stops_sft_after_the_step_with_a_checkpoint_the_rerun_resumes(tmp_path):
    _sigterm_and_rerun(SFT_SMALL, tmp_path, max_steps=60)
