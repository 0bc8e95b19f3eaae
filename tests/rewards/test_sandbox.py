"""The Python sandbox against adversarial programs: each is contained and reported, the
machine untouched, the run alive."""

from __future__ import annotations

import time

import pytest

from rewards.envs import get_env
from rewards.envs.sandbox import Limits, PythonTool, run_python

LIMITS = Limits(cpu_s=1, memory_mb=256, wall_s=4, output_bytes=2000)


def test_plain_program_prints_and_may_write_its_temp_dir():
    result = run_python("open('a.txt', 'w').write('hi')\nprint(open('a.txt').read(), 6 * 7)", LIMITS)
    assert result.ok and result.output == "hi 42\n"


def test_fork_bomb_is_refused():
    result = run_python("import os\nwhile True:\n    os.fork()", LIMITS)
    assert not result.ok and "os.fork is not allowed" in result.output


@pytest.mark.parametrize("code", ["import subprocess; subprocess.run(['echo', 'hi'])", "import os; os.system('echo hi')",
                                  "import multiprocessing", "import ctypes"])
def test_other_ways_to_start_processes_or_native_code_are_refused(code):
    result = run_python(code, LIMITS)
    assert not result.ok and "sandbox:" in result.output and "hi" not in result.output.split("sandbox:")[0][-3:]


def test_infinite_loop_hits_the_cpu_limit():
    t0 = time.perf_counter()
    result = run_python("while True:\n    pass", LIMITS)
    assert not result.ok and "CPU limit" in result.error and time.perf_counter() - t0 < LIMITS.wall_s + 2


def test_sleeping_forever_hits_the_wall_limit():
    result = run_python("import time\ntime.sleep(60)", Limits(cpu_s=1, wall_s=1))
    assert result.timed_out and "wall-clock limit" in result.error


def test_huge_output_is_cut_and_never_buffered_whole():
    result = run_python("while True:\n    print('x' * 100000)", LIMITS)
    assert not result.ok and "output limit" in result.error
    assert len(result.output) < LIMITS.output_bytes + 100


def test_memory_limit():
    result = run_python("a = bytearray(1024 ** 3)", LIMITS)
    assert not result.ok and "MemoryError" in result.output


def test_network_is_refused():
    result = run_python("import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 80))", LIMITS)
    assert not result.ok and "no network" in result.output


def test_writes_outside_the_temp_dir_are_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    for code in [f"open({str(target)!r}, 'w').write('x')", f"import os; os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)"]:
        result = run_python(code, LIMITS)
        assert not result.ok and "outside the working directory is not allowed" in result.output
        assert not target.exists()
    target.write_text("keep")
    for code in [f"import os; os.remove({str(target)!r})", f"import os; os.rename({str(target)!r}, 'mine')"]:
        result = run_python(code, LIMITS)
        assert not result.ok and "outside the working directory is not allowed" in result.output
        assert target.read_text() == "keep"
    assert "os.chdir is not allowed" in run_python("import os; os.chdir('/')", LIMITS).output


def test_reading_the_environment_finds_nothing_secret(monkeypatch):
    monkeypatch.setenv("ALIGN_TEST_SECRET", "s3cret")
    result = run_python("import os; print(sorted(os.environ))", LIMITS)
    assert result.ok and "ALIGN_TEST_SECRET" not in result.output


def test_python_sandbox_environment_runs_tool_calls_and_survives_bad_code():
    env = get_env("python_sandbox", row={"prompt": "q", "ground_truth": "42"}, limits={"cpu_s": 1, "wall_s": 4})
    step = env.step('<tool_call>{"name": "python", "arguments": {"code": "print(6 * 7)"}}</tool_call>')
    assert step.observation[0]["content"] == "42\n" and not step.done
    bad = env.step('<tool_call>{"name": "python", "arguments": {"code": "while True: pass"}}</tool_call>')
    assert "CPU limit" in bad.observation[0]["content"] and not bad.done
    assert env.step("#### 42").reward == 1.0
    assert PythonTool(cpu_s=1)("") == "(no output)"
