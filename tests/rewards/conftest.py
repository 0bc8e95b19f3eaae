"""Fixtures that start real reward-server processes on 127.0.0.1 and always stop them."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 30
LIFETIME_S = 120  # a server left behind by a crashed test run stops by itself


def _start(argv: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, *argv, "--exit-after", str(LIFETIME_S)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=STARTUP_TIMEOUT_S)
    except queue.Empty:
        line = ""
    if " on http://" not in line:
        _stop(proc)
        raise RuntimeError(f"reward server did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc, line.strip().rsplit(" on ", 1)[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


@pytest.fixture
def start_server():
    """start_server(argv) -> url: runs `python <argv>` and stops it at teardown."""
    procs = []

    def start(argv: list[str]) -> str:
        proc, url = _start(argv)
        procs.append(proc)
        return url

    yield start
    for proc in procs:
        _stop(proc)


@pytest.fixture(scope="module")
def story_server():
    """One `python -m rewards.remote --reward story` process shared by a module's tests."""
    proc, url = _start(["-m", "rewards.remote", "--reward", "story"])
    yield url
    _stop(proc)


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
