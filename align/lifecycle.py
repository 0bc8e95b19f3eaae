"""Nothing of ours outlives a run: a graceful stop on SIGTERM/SIGINT, and a watchdog that ends
the local Ray cluster of a driver that died.

Stop signals. `python -m align` runs every trainer inside `stop_on_signals()`. The first SIGTERM
or SIGINT only sets a flag; every trainer ends each step with `save_or_stop`, which writes a
checkpoint when one is due or a signal came, and after a signal raises `RunStopped`. The entry
point then prints "stopped by SIGTERM at step N; checkpoint at ..." and exits with 128 + the
signal's number (143 for SIGTERM, 130 for SIGINT), the shell's code for death by that signal, so
a scheduler sees an unfinished run. Rerunning the same command resumes from that checkpoint. A
second signal exits at once; the last checkpoint stays intact (checkpoints are renamed into
place whole). A signal during start-up stops the run after its first step.

The Ray watchdog. A driver that starts its own Ray (`cluster.address=local`) owns Ray's daemons:
GCS, raylet, dashboard, the dashboard and runtime-env agents, the workers. When the driver is
SIGKILLed (an OOM kill), GCS and raylet follow it within seconds but the two agents live on for
a minute or more (Ray 2.60: they report the raylet's death to the dead GCS and wait for it).
`watch_ray_session` starts a small process in a session of its own holding the read end of a
pipe whose write end only the driver holds, so end-of-file means the driver released it or died.
The watchdog then ends every process of that Ray session (SIGTERM, then SIGKILL) and says which
when the driver died. A session is known by its directory (`<temp dir>/session_<time>_<pid>`),
unique to one start: the daemons name it on their command lines, and the agents and workers
(retitled `ray::...`) hold their log files in it open. A cluster joined by address, or one that
another process started, is never touched. Linux only (it reads /proc); elsewhere a no-op.

This file imports only the standard library: the watchdog runs it as a script.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

if TYPE_CHECKING:
    from align.config import TrainerConfig
    from align.trainers.metrics import RunLogger

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

# pyarrow (which `datasets` imports) bundles jemalloc, and that jemalloc starts a background
# thread as soon as libarrow loads, although Arrow's default pool is mimalloc and nothing of ours
# allocates through jemalloc. That thread is a known source of random segfaults (apache/arrow#44342,
# NVIDIA/cudf#17018), and the likely one of a worker's SIGSEGV in CI (stop 24: a thread with no
# Python frames, numbered where the jemalloc thread is in our workers). jemalloc reads this
# variable when it loads: the thread never starts. Set for the driver (`quiet_arrow_jemalloc`) and
# for every Ray worker (`align.workers.group.worker_env`: a remote cluster inherits nothing).
ARROW_JEMALLOC_ENV = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}


def quiet_arrow_jemalloc() -> None:
    """Keep Arrow's bundled jemalloc from starting its background thread in this process and the
    processes it starts (`ARROW_JEMALLOC_ENV`); effective when pyarrow is not loaded yet. A value
    the user set is left alone."""
    for key, value in ARROW_JEMALLOC_ENV.items():
        os.environ.setdefault(key, value)


_received: list[int] = []  # stop signals received while `stop_on_signals` is active, in order


# ---- stopping on a signal ---------------------------------------------------------------------
class RunStopped(Exception):
    """A run stopped by a signal after the step it reached was checkpointed."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signal_name = signal.Signals(signum).name
        self.step, self.checkpoint = step, checkpoint
        self.exit_code = 128 + signum
        where = f"checkpoint at {checkpoint}; rerun the same command to resume" if checkpoint else "no checkpoint"
        super().__init__(f"stopped by {self.signal_name} at step {step}; {where}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """While inside, the first SIGTERM or SIGINT asks the trainer to stop after the step in flight
    (`save_or_stop`); a second one exits the process at once. Outside the main thread (where
    Python cannot install handlers) the signals keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if _received:
            _say(f"second {name}: exiting now; the last checkpoint is intact")
            os._exit(128 + signum)
        _received.append(signum)
        _say(f"{name}: stopping after the step in flight, with a checkpoint ({name} again to exit at once)")

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _restore_handlers(previous)
        _received.clear()


@contextlib.contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Restore the SIGTERM and SIGINT handlers on leaving: `ray.init` installs its own for SIGTERM
    (an immediate `sys.exit`), which would replace `stop_on_signals`' handler."""
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main else {}
    try:
        yield
    finally:
        _restore_handlers(previous)


def _restore_handlers(previous: dict) -> None:
    for s, handler in previous.items():
        if handler is not None:
            signal.signal(s, handler)


def stop_requested() -> bool:
    return bool(_received)


def save_or_stop(step: int, trainer: TrainerConfig, save: Callable[[], Path], log: RunLogger | None = None) -> None:
    """End step `step` of a training loop: checkpoint (`save()`, which returns the folder) every
    `trainer.save_every` steps, at the last step, and after a stop signal; after a stop signal
    also close `log` and raise `RunStopped`. The last step finishes the run normally."""
    stopping = stop_requested() and step < trainer.max_steps
    checkpoint = None
    if stopping or step % trainer.save_every == 0 or step == trainer.max_steps:
        checkpoint = save()
    if stopping:
        if log is not None:
            log.close()
        raise RunStopped(_received[0], step, checkpoint)


# ---- the Ray session watchdog -----------------------------------------------------------------
class RayWatchdog:
    """The watchdog process of one local Ray session; `release()` after `ray.shutdown()`."""

    def __init__(self, session_dir: str):
        self.session_dir, self._pipe, self._proc = session_dir, None, None
        if not os.path.isdir("/proc"):
            return
        read_end, self._pipe = os.pipe()  # not inherited by exec'd children: only we hold the write end
        self._proc = subprocess.Popen([sys.executable, "-I", __file__, session_dir, str(os.getpid())],
                                      stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True)
        os.close(read_end)

    def release(self, timeout_s: float = 15.0) -> None:
        """Tell the watchdog that Ray was shut down: it ends what is left of the session (normally
        nothing) and exits."""
        if self._pipe is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._pipe, b"released\n")
        os.close(self._pipe)
        self._pipe = None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=timeout_s)


def watch_ray_session(session_dir: str) -> RayWatchdog:
    """Start the watchdog of the local Ray session `session_dir`, which this process started."""
    return RayWatchdog(session_dir)


def session_processes(session_dir: str) -> list[tuple[int, str]]:
    """(pid, name) of the live processes of the Ray session `session_dir`, this one excepted."""
    named = re.compile(re.escape(session_dir) + r"(?![\w.-])")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if named.search(cmdline) or (cmdline.startswith("ray::") and _holds_file_under(entry, session_dir)):
                found.append((int(entry), _short_name(cmdline)))
        except OSError:  # gone, or not ours to read
            continue
    return found


def end_session(session_dir: str, grace_s: float = 5.0) -> list[tuple[int, str]]:
    """SIGTERM every process of the Ray session, SIGKILL those left after `grace_s`; returns the
    (pid, name) of every process it signalled."""
    signalled: dict[int, str] = {}
    deadline = time.monotonic() + grace_s
    while procs := session_processes(session_dir):
        late = time.monotonic() > deadline
        for pid, name in procs:
            if late or pid not in signalled:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
            signalled.setdefault(pid, name)
        if time.monotonic() > deadline + 5.0:
            break
        time.sleep(0.2)
    return sorted(signalled.items())


def _holds_file_under(pid: str, directory: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            if os.readlink(f"{fd_dir}/{fd}").startswith(directory + "/"):
                return True
    return False


def _short_name(cmdline: str) -> str:
    """`ray::DashboardAgent`, `raylet`, `gcs_server`, `dashboard.py`: the program, not the interpreter."""
    words = cmdline.split()
    if not words or words[0].startswith("ray::"):
        return words[0] if words else "?"
    if os.path.basename(words[0]).startswith("python"):
        words = [w for w in words[1:] if not w.startswith("-")] or words
    return os.path.basename(words[0])


def _say(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"align: {message}", file=sys.stderr, flush=True)


def _watch(session_dir: str, owner: int) -> None:
    """The watchdog: wait for the owner to release the session or die, then end the session."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    released = sys.stdin.buffer.read() == b"released\n"  # blocks until end-of-file
    ended = end_session(session_dir)
    why = "after its Ray shut down" if released else "which died without shutting its Ray down"
    if ended:
        names = ", ".join(f"{name} ({pid})" for pid, name in ended)
        _say(f"ended {len(ended)} processes of {session_dir} left by pid {owner}, {why}: {names}")
    elif not released:  # a dead owner is always reported, even when its Ray went down by itself
        _say(f"nothing of {session_dir} was left by pid {owner}, {why}")


if __name__ == "__main__":
    _watch(sys.argv[1], int(sys.argv[2]))
