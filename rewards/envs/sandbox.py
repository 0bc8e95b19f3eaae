"""Run model-written Python in a separate, limited process: the `python` tool and the
`python_sandbox` environment.

Each run gets a fresh process (`python -I`: isolated mode, no user site, no PYTHON* env vars,
an empty environment) in a fresh temporary directory, deleted afterwards, with:
- resource limits (`resource.setrlimit`): CPU seconds (RLIMIT_CPU), address space (RLIMIT_AS),
  the size of any file it writes (RLIMIT_FSIZE, which also bounds its output, written to a file
  in the temp dir rather than piped into this process), and processes (RLIMIT_NPROC = 0, which
  the kernel ignores for root: as root the child drops to `nobody` first when `nobody` can run
  this Python, and then the file system is only as writable as it is to `nobody`);
- a wall-clock timeout, after which its whole process group is killed;
- an audit hook (PEP 578), installed before the user's code runs, that refuses: creating
  processes (os.fork, os.system, subprocess, os.exec*, posix_spawn), sockets (no network), loading
  ctypes / native libraries, and writing, deleting or renaming files outside the temp dir.

The audit hook is defence in depth, not a security boundary against a determined attacker
(CPython's docs say as much); for untrusted code at scale run the workers in a container, as
veRL's sandbox fusion does. A limit hit is reported to the model as an error observation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

from rewards.envs.base import register_env
from rewards.envs.tools import ToolEnv, register_tool

# Runs in the child before the user's code (read from main.py in the temp dir).
_PRELUDE = r'''
import os, sys
_ROOT = os.path.realpath(os.getcwd())
_NO_PROCESS = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
               "os.kill", "os.killpg", "pty.spawn"}
_NO_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"}
_PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                "os.symlink", "os.link", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move"}

def _inside(path):
    if isinstance(path, int):
        return True
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _hook(event, args):
    if event in _NO_PROCESS:
        raise PermissionError(f"sandbox: {event} is not allowed (no new processes)")
    if event.startswith("socket."):
        raise PermissionError(f"sandbox: {event} is not allowed (no network)")
    if event == "import" and args[0].split(".")[0] in _NO_IMPORT:
        raise ImportError(f"sandbox: import of {args[0]} is not allowed")
    if event == "ctypes.dlopen" or event == "os.chdir":
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and not _inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the working directory is not allowed")
    elif event in _PATH_EVENTS and not all(_inside(a) for a in args[:2] if isinstance(a, (str, bytes, os.PathLike))):
        raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

sys.addaudithook(_hook)
del _hook
__code = open("main.py").read()
exec(compile(__code, "main.py", "exec"), {"__name__": "__main__"})
'''


@dataclass(frozen=True)
class Limits:
    """cpu_s: CPU seconds; memory_mb: address space; wall_s: wall-clock seconds; output_bytes:
    the most output (stdout + stderr) kept, and the largest file it may write."""

    cpu_s: int = 2
    memory_mb: int = 512
    wall_s: float = 10.0
    output_bytes: int = 8192


@dataclass
class RunResult:
    output: str  # stdout + stderr, cut to limits.output_bytes
    returncode: int | None
    timed_out: bool
    error: str = ""  # a limit that was hit, in words

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


_NOBODY = 65534


def _others_can_run_python() -> bool:
    """Whether `nobody` could start this interpreter: its binary and standard library reachable
    and readable by others (a Python under /root usually is not; then the child stays root and
    process creation is refused by the audit hook alone)."""
    import stat
    import sysconfig

    for target in {os.path.realpath(sys.executable), os.path.realpath(sysconfig.get_paths()["stdlib"])}:
        path = target
        while True:
            try:
                mode = os.stat(path).st_mode
            except OSError:
                return False
            if not mode & stat.S_IXOTH or (path == target and not mode & stat.S_IROTH):
                return False
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    return True


def _limit_child(limits: Limits, drop_to: int | None):
    import resource

    def preexec():
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to)
            os.setuid(drop_to)
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.output_bytes * 4, limits.output_bytes * 4))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return preexec


def run_python(code: str, limits: Limits = Limits()) -> RunResult:
    """Run `code` in a sandboxed child (see the module docstring) and return its output."""
    drop_to = _NOBODY if os.geteuid() == 0 and _others_can_run_python() else None
    with tempfile.TemporaryDirectory(prefix="align-sandbox-") as tmp:
        with open(os.path.join(tmp, "main.py"), "w") as f:
            f.write(code)
        out_path = os.path.join(tmp, ".output")
        if drop_to is not None:
            os.chown(tmp, drop_to, drop_to)
            os.chown(os.path.join(tmp, "main.py"), drop_to, drop_to)
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _PRELUDE], cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": tmp},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_limit_child(limits, drop_to), close_fds=True,
            )
            timed_out = False
            try:
                proc.wait(timeout=limits.wall_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        with open(out_path, "rb") as f:
            raw = f.read(limits.output_bytes + 1)
    output = raw[: limits.output_bytes].decode("utf-8", errors="replace")
    error = _limit_hit(proc.returncode, timed_out, limits)
    if len(raw) > limits.output_bytes:
        output += f"\n... (output cut at {limits.output_bytes} bytes)"
        error = error or f"output limit of {limits.output_bytes} bytes exceeded"
    return RunResult(output, proc.returncode, timed_out, error)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _limit_hit(code: int | None, timed_out: bool, limits: Limits) -> str:
    if timed_out:
        return f"wall-clock limit of {limits.wall_s:g} s exceeded"
    if code == -signal.SIGXCPU or code == -signal.SIGKILL:
        return f"CPU limit of {limits.cpu_s} s exceeded"
    if code == -signal.SIGXFSZ:
        return f"output limit of {limits.output_bytes} bytes exceeded"
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return ""


class PythonTool:
    """The tool: `python(code="print(6 * 7)")` -> its printed output (or the error)."""

    name = "python"
    schema = {"type": "function", "function": {
        "name": "python",
        "description": "Run Python code in a sandbox (no network, no files outside a temp dir, limited time "
                       "and memory) and return what it prints.",
        "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "the program"}},
                       "required": ["code"]}}}

    def __init__(self, **limits: Any):
        self.limits = Limits(**limits)

    def __call__(self, code: str) -> str:
        result = run_python(str(code), self.limits)
        if result.error:
            return f"{result.output}\nerror: {result.error}".strip()
        return result.output if result.output else "(no output)"


register_tool("python")(PythonTool)


@register_env("python_sandbox")
def python_sandbox_env(row: dict[str, Any], reward: str = "math", parser: str = "hermes",
                       limits: dict[str, Any] | None = None, **options: Any) -> ToolEnv:
    """Code-execution tool calls until an answer, scored by `reward` (math) on `ground_truth`."""
    return ToolEnv(row, tools=[PythonTool(**(limits or {}))], parser=parser, reward=reward, **options)

