"""The exact-resume check shared by the SIGKILL tests of GRPO, PPO and RM.

`check_sigkill_resume` runs `python -m align <overrides>` three ways: once uninterrupted, once
SIGKILLed right after a checkpoint (step k) was logged and written, and once more with the very
same command, which must resume from step k and redo at least three steps. The resumed run's
metrics.jsonl must hold exactly one row per step, and every row (all metrics but wall times) and
every tensor of the final checkpoint must equal the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from align.config import REPO_ROOT

# Wall times and rates: the only metrics that may differ between two runs of the same command.
WALL_TIME = re.compile(r"^time$|^time/|^time_to_first_step$|_per_s$")


def read_rows(out: Path) -> dict[int, dict]:
    """metrics.jsonl as {step: row}; a line still being written is skipped. Fails on a step
    logged twice."""
    rows: dict[int, dict] = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        assert row["step"] not in rows, f"{path}: step {row['step']} logged twice"
        rows[row["step"]] = row
    return rows


def _without_wall_times(row: dict) -> dict:
    return {k: v for k, v in row.items() if not WALL_TIME.search(k)}


def _latest(out: Path) -> str | None:
    pointer = out / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def _start(overrides: list[str], out: Path, name: str) -> tuple[subprocess.Popen, Path]:
    """Start the run in the background, its stderr in `<out>.<name>.log`."""
    log = out.parent / f"{out.name}.{name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "align", *overrides, f"output_dir={out}"], cwd=REPO_ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=err)
    return proc, log


def _finish(proc: subprocess.Popen, log: Path, timeout: float) -> str:
    """Wait for a run that must succeed; returns its stderr."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{log.name}: exit {proc.returncode}\n{log.read_text()[-3000:]}"
    return log.read_text()


def _kill_after_first_checkpoint(overrides: list[str], out: Path, timeout: float) -> int:
    """Start the run and SIGKILL it as soon as `checkpoints/latest` names a checkpoint (the step
    was logged before it was saved); returns that checkpoint's step."""
    proc, log = _start(overrides, out, "killed")
    try:
        deadline = time.time() + timeout
        while _latest(out) is None:
            assert proc.poll() is None, f"the run exited ({proc.returncode}) before its first checkpoint:\n" \
                                        f"{log.read_text()[-3000:]}"
            assert time.time() < deadline, "no checkpoint was written in time"
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: no handler, no cleanup
        proc.wait(timeout=60)
    assert proc.returncode == -9, f"the run was not killed (exit {proc.returncode})"
    return int(_latest(out).removeprefix("step_"))


def check_sigkill_resume(overrides: list[str], tmp_path: Path, *, max_steps: int, save_every: int,
                         timeout: float = 300) -> dict[int, dict]:
    """The three runs described in the module docstring; `overrides` must not set max_steps,
    save_every or output_dir. The kill comes once the first checkpoint is written; it may land a
    checkpoint or two later on a slow machine, as long as at least three steps are left to redo.
    Returns the resumed run's rows."""
    overrides = [*overrides, f"trainer.max_steps={max_steps}", f"trainer.save_every={save_every}",
                 "trainer.keep_checkpoints=3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = _start(overrides, whole, "whole")  # alongside the killed run: the waits overlap
    try:
        resumed_from = _kill_after_first_checkpoint(overrides, killed, timeout)
    finally:
        _finish(*uninterrupted, timeout)
    expected = read_rows(whole)
    assert sorted(expected) == list(range(max_steps + 1))
    assert max_steps - resumed_from >= 3, f"the kill came too late: the newest checkpoint is step {resumed_from}"
    stderr = _finish(*_start(overrides, killed, "resumed"), timeout)
    assert f"resumed from {killed / 'checkpoints' / f'step_{resumed_from}'} at step {resumed_from}" in stderr, \
        stderr[-3000:]

    got = read_rows(killed)
    assert sorted(got) == list(range(max_steps + 1)), "metrics.jsonl must hold exactly one row per step"
    for step in range(max_steps + 1):
        assert _without_wall_times(got[step]) == _without_wall_times(expected[step]), \
            f"step {step} differs after resuming from step {resumed_from}"
    final = Path("checkpoints") / f"step_{max_steps}"
    files = sorted(p.relative_to(whole / final) for p in (whole / final).rglob("*.safetensors"))
    assert files, f"no tensors in {whole / final}"
    assert files == sorted(p.relative_to(killed / final) for p in (killed / final).rglob("*.safetensors"))
    for name in files:
        a, b = load_file(str(whole / final / name)), load_file(str(killed / final / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    return got
