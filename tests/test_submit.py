"""Ray job submission against a real Ray head that this test starts on loopback.

The head: `ray start --head` with the dashboard (the Jobs API) on 127.0.0.1 and every port
picked free, so it cannot collide with another cluster on the machine. Its GCS and raylet still
listen beyond loopback (Ray binds them to all interfaces whatever --node-ip-address says); the
test only ever talks to 127.0.0.1. Environment pitfalls handled (docs/ENVIRONMENT.md of the
workplace):
- token auth: once any local `ray.init()` has written ~/.ray/auth_token, `ray start --head`
  turns token auth on and a client without the token fails with "Missing authentication
  token"; the head and the clients here run with RAY_AUTH_MODE=disabled.
- RAY_TMPDIR (not `--temp-dir`, which leaves `ray_current_cluster` behind) puts the session in a
  private, short temp dir (Ray's unix sockets live there; paths over 107 bytes fail).
- the job's `python` is the first on the head's PATH: the head gets our venv's bin first, as if
  started from an activated venv.
- teardown kills the head's own process session (tests/_session.py), not `ray stop`, which
  would kill every Ray process on the machine.

Timings: on an idle 2-core box a head comes up in ~14 s and a small job succeeds in ~11 s
(docs/ENVIRONMENT.md of the workplace), about a minute for this file. Measured here with the
2 cores shared by other jobs (load average ~11): head 57 s, the 2-step SFT job 81 s, the
failing job 26 s, teardown 13 s (3 min in all), hence the generous timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
from _session import kill_session

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 150
START_ATTEMPTS = 3

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dry_run_shows_the_job_spec_without_a_cluster():
    done = subprocess.run(
        [sys.executable, "-m", "align.launch", "--dry-run", "--env", "HF_HOME=/cache", "--pip", "trl",
         "algo=sft", "data.columns={prompt: question}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    spec = json.loads(done.stdout)
    assert spec["entrypoint"] == "python -m align algo=sft 'data.columns={prompt: question}'"
    renv = spec["runtime_env"]
    assert renv["working_dir"] == str(ROOT) and renv["pip"] == ["trl"]
    assert {".venv*", "runs/", ".git"} <= set(renv["excludes"])
    assert renv["env_vars"]["HF_HOME"] == "/cache" and renv["env_vars"]["ALIGN_DATA_DIR"]


def _start_head(env: dict, cwd: str) -> tuple[int, int, str]:
    """`ray start --head` on loopback with every port free; returns (its session id, the
    dashboard port, its output). A non-zero exit leaves processes behind in that session."""
    dashboard = _free_port()
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={_free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        "--num-cpus=1",
        "--disable-usage-stats",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.pid, (dashboard if proc.returncode == 0 else 0), out


@pytest.fixture(scope="module")
def ray_head():
    """A one-CPU Ray head on loopback; yields (dashboard address, env for clients).

    Start-up is tried up to START_ATTEMPTS times: Ray's raylet aborts ("Timed out waiting for
    file .../dashboard_agent_listen_port_...") when its Python dashboard agent takes more than
    15 s to start, a wait hard-coded in Ray 2.60 (RAY_agent_register_timeout_ms does not change
    it), which happens when other jobs load the two cores. A failed attempt is cleaned up by its
    session id before the next."""
    tmp = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_TMPDIR": tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    sessions = []
    try:
        for _ in range(START_ATTEMPTS):
            sid, dashboard, out = _start_head(env, tmp)
            sessions.append(sid)
            if dashboard:
                break
            kill_session(sid)
        else:
            pytest.fail(f"ray start --head failed {START_ATTEMPTS} times; last output:\n{out[-3000:]}")
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        for sid in sessions:
            kill_session(sid)
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(address: str, env: dict, overrides: list[str], job_id: str) -> subprocess.CompletedProcess:
    """The launcher as a user runs it: `python scripts/submit.py --address ... <overrides>`."""
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "submit.py"), "--address", address, "--job-id", job_id,
         "--timeout", "300", *overrides],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=330,
    )


def _job_record(address: str, env: dict, job_id: str) -> dict:
    """Status and logs read back afterwards through a fresh Jobs API client."""
    code = (
        "import json, sys\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "c = JobSubmissionClient(sys.argv[1])\n"
        "print(json.dumps({'status': c.get_job_status(sys.argv[2]).value, 'logs': c.get_job_logs(sys.argv[2]),"
        " 'entrypoint': c.get_job_info(sys.argv[2]).entrypoint}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, address, job_id], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hydra_run_submitted_as_ray_job_succeeds_with_logs_and_outputs(ray_head, tmp_path):
    address, env = ray_head
    out_dir = tmp_path / "run"
    job_id = f"align-test-{uuid.uuid4().hex[:8]}"
    overrides = [
        "algo=sft", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.warmup_steps=0",
        "trainer.eval_every=2", "trainer.eval_batches=1", "trainer.save_every=2", "trainer.progress=false",
        "trainer.num_threads=1", "data.limit=16", "data.val_size=4", "data.max_length=64",
        "data.max_prompt_length=48", "data.max_response_length=16", f"output_dir={out_dir}",
    ]
    done = _submit(address, env, overrides, job_id)
    assert done.returncode == 0, f"launcher failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert f"{job_id} SUCCEEDED" in done.stderr
    assert "SFT done" in done.stdout  # the job's logs were streamed while it ran

    record = _job_record(address, env, job_id)
    assert record["status"] == "SUCCEEDED"
    assert record["entrypoint"].startswith("python -m align algo=sft trainer.max_steps=2")
    assert "SFT done" in record["logs"] and str(out_dir) in record["logs"]

    # The run really happened where the override said, with the overrides applied.
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 2
    assert all(r["loss"] == r["loss"] for r in rows if "loss" in r)  # finite, not NaN
    assert json.loads((out_dir / "config.json").read_text())["trainer"]["max_steps"] == 2


def test_failing_job_gives_nonzero_exit_and_readable_logs(ray_head, tmp_path):
    address, env = ray_head
    job_id = f"align-test-{uuid.uuid4().hex[:8]}"
    done = _submit(address, env, ["trainer.lr_scheduler=cosin", f"output_dir={tmp_path / 'run'}"], job_id)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"{job_id} FAILED" in done.stderr
    record = _job_record(address, env, job_id)
    assert record["status"] == "FAILED"
    assert "trainer.lr_scheduler" in record["logs"] and "cosin" in record["logs"]


def test_job_scores_with_a_reward_file_uploaded_in_its_working_dir(ray_head, tmp_path):
    """`reward.name=my_rewards.py:score`: the file is in the job's working directory (uploaded by
    the launcher with --working-dir), not in this project; the job's driver loads it there."""
    address, env = ray_head
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_rewards.py").write_text(
        "def score(prompts, responses, **metadata):\n    return [42.0 for _ in responses]\n")
    out_dir = tmp_path / "run"
    job_id = f"align-test-{uuid.uuid4().hex[:8]}"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "submit.py"), "--address", address, "--job-id", job_id,
         "--timeout", "300", "--working-dir", str(work), "--env", f"PYTHONPATH={ROOT}",
         "algo=eval", "reward.name=my_rewards.py:score", "data.limit=2", "algo.n=1", "algo.k=[1]",
         "rollout.max_new_tokens=4", "trainer.progress=false", "trainer.num_threads=1", f"output_dir={out_dir}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=330,
    )
    assert done.returncode == 0, f"launcher failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = [json.loads(line) for line in (out_dir / "eval.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["scores"] == [42.0] for r in rows), rows
    assert json.loads((out_dir / "summary.json").read_text())["reward"] == "my_rewards.py:score"


def test_grpo_job_runs_an_environment_file_from_its_working_dir_on_the_workers(ray_head, tmp_path):
    """`env.name=my_envs.py:Always` in a GRPO job on the cluster (cluster=ray): the episodes run
    on the actor worker, which loads the file from the job's uploaded working directory; the
    environment stamps the process it ran in, which is not the job's driver."""
    address, env = ray_head
    work = tmp_path / "work"
    work.mkdir()
    (work / "my_envs.py").write_text(
        "import os\n"
        "from rewards.envs import Step\n\n\n"
        "class Always:\n"
        "    tools = []\n\n"
        "    def __init__(self, row):\n"
        "        self.where = os.getpid()\n\n"
        "    def step(self, turn):\n"
        "        return Step('', 1.0, True, {'pid': self.where})\n")
    out_dir = tmp_path / "run"
    job_id = f"align-test-{uuid.uuid4().hex[:8]}"
    overrides = [
        "algo=grpo", "cluster=ray", "env.name=my_envs.py:Always", "env.max_turns=1", "trainer.max_steps=1",
        "trainer.eval_every=1", "trainer.save_every=1", "trainer.progress=false", "trainer.num_threads=1",
        "data.limit=12", "data.val_size=2", "algo.rollout_batch_size=2", "algo.num_generations=2",
        "algo.eval_prompts=2", "algo.eval_samples=1", "rollout.max_new_tokens=4", f"output_dir={out_dir}",
    ]
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "submit.py"), "--address", address, "--job-id", job_id,
         "--timeout", "400", "--working-dir", str(work), "--env", f"PYTHONPATH={ROOT}", *overrides],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=430,
    )
    assert done.returncode == 0, f"launcher failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r.get("step") == 1 and "env/turns" in r)
    assert step["env/success"] == 1.0 and step["reward/mean"] == 1.0 and step["env/turns"] == 1.0
    workers = json.loads((out_dir / "workers.json").read_text())
    assert step["env/pid"] in {w["pid"] for w in workers}  # built in the worker process


class _FakeJobs:
    """The slice of JobSubmissionClient that `follow` uses, with scripted answers."""

    def __init__(self, lines, statuses, hang=False, broken=False):
        self.lines, self.statuses, self.hang, self.broken = lines, list(statuses), hang, broken

    async def tail_job_logs(self, job_id):
        import asyncio

        if self.broken:
            raise ConnectionError("websocket refused")
        for line in self.lines:
            yield line
        if self.hang:
            await asyncio.sleep(3600)

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0])

    def get_job_logs(self, job_id):
        return "".join(self.lines)


def test_follow_streams_logs_then_waits_for_a_terminal_status():
    import io

    from align.launch import follow

    out = io.StringIO()
    # the log stream can close while the status still says RUNNING: follow polls until it ends
    status = follow(_FakeJobs(["step 1\n", "done\n"], ["RUNNING", "SUCCEEDED"]), "j", out=out, poll_s=0.01)
    assert status.value == "SUCCEEDED" and out.getvalue() == "step 1\ndone\n"


def test_follow_gives_up_at_the_timeout_and_falls_back_to_polling():
    import io

    from align.launch import follow

    out = io.StringIO()
    assert follow(_FakeJobs(["a\n"], ["RUNNING"], hang=True), "j", timeout=0.3, out=out) is None
    assert out.getvalue() == "a\n"
    out = io.StringIO()  # no websocket: poll, then print the whole log once
    status = follow(_FakeJobs(["x\n"], ["PENDING", "FAILED"], broken=True), "j", out=out, poll_s=0.01)
    assert status.value == "FAILED" and out.getvalue() == "x\n"
