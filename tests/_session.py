"""Stopping every process a test started in its own session, and nothing else.

`ray stop` is not used: it kills every Ray process on the machine, other people's clusters
included. A test instead starts `ray start --head` (or a server that calls `ray.init()`) with
`start_new_session=True`; the daemons Ray spawns (GCS, raylet, dashboard, agents, workers) keep
that session id after the launcher exits, so the session id names exactly our processes.
"""

from __future__ import annotations

import os
import signal
import time


def session_pids(sid: int) -> list[int]:
    """Live processes whose session id is `sid` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # pid (comm) state ppid pgrp session ...; comm may hold spaces, so split after ')'
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def kill_session(sid: int, grace_s: float = 10.0) -> list[int]:
    """SIGTERM every process of session `sid`, SIGKILL what is left after `grace_s`; returns
    the pids that needed SIGKILL."""
    for pid in session_pids(sid):
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.2)
    stubborn = session_pids(sid)
    for pid in stubborn:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return stubborn


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
