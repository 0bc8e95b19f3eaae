"""Submit a Hydra run to a Ray cluster through the Ray Jobs API.

    python -m align.launch --address http://127.0.0.1:8265 -- \\
        algo=sft trainer.max_steps=200 output_dir=/mnt/shared/runs/sft-1
    python scripts/submit.py --no-wait --env HF_HOME=/mnt/cache algo=sft ...
    python -m align.launch --dry-run algo=sft      # print the job spec, submit nothing

Options come first; everything else is a Hydra override (a `--` before them is allowed). The
job's entrypoint is `python -m align <overrides>`, run in the job's working directory: a copy
of this project (its root without .venv*, runs/, outputs/, .git, caches) that Ray uploads with
the job, so the code the cluster runs is the code you have here, committed or not.

What the cluster must provide:
- A Python with our dependencies. The entrypoint's `python` is whatever is first on the PATH of
  the Ray processes: a local head started from an activated venv (`source .venv/bin/activate;
  ray start --head ...`) gives the job that venv. On a real cluster use nodes (or an image)
  built with `pip install -e .` / the same requirements, or let Ray install them per job with
  `--pip PKG` / `--uv PKG` (runtime_env `pip` / `uv`: a virtualenv per job, slow the first
  time, cached after), or name an interpreter with `--python /opt/venv/bin/python`.
- The data: `${shared_data:}` in configs/ resolves to $ALIGN_DATA_DIR. The launcher forwards
  the local value (this machine's shared data folder) unless `--env ALIGN_DATA_DIR=...` says
  where the cluster keeps it.
- Somewhere to write: the default `output_dir` (runs/...) is relative to the job's working
  directory, a temporary copy that Ray deletes; pass `output_dir=/a/shared/path`.

Authentication (Ray 2.60): a head with token auth (`RAY_AUTH_MODE=token`, or the default once
`~/.ray/auth_token` exists on the head) rejects a client without the token ("Missing
authentication token"): run this with `RAY_AUTH_MODE=token` and the token in
`~/.ray/auth_token`, `$RAY_AUTH_TOKEN_PATH` or `$RAY_AUTH_TOKEN`. A head started with
`RAY_AUTH_MODE=disabled` needs nothing. The Jobs API is plain HTTP on the dashboard port:
keep it on 127.0.0.1 (`--dashboard-host=127.0.0.1`) or behind a tunnel, never on a public
interface without auth.

Exit status: 0 when the job SUCCEEDED (or was submitted, with --no-wait); 1 when it FAILED or
was STOPPED, or the cluster could not be reached; 124 when --timeout ran out (the job is left
running; follow it with `ray job logs -f <id>`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from typing import Any, Sequence, TextIO

from align.config import REPO_ROOT, shared_data_dir

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Never uploaded with the job (gitignore syntax, as Ray's `excludes`): environments, run
# outputs, VCS history and caches, none of which the job needs and some of which are huge.
DEFAULT_EXCLUDES = (
    ".venv*",
    "runs/",
    "outputs/",
    "multirun/",
    ".git",
    "__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
)

EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT = 0, 1, 124


def build_entrypoint(overrides: Sequence[str], python: str = "python") -> str:
    """The shell command the job runs: `python -m align <overrides>`, each override quoted."""
    return shlex.join([python, "-m", "align", *overrides])


def build_runtime_env(
    working_dir: str,
    env_vars: dict[str, str],
    *,
    excludes: Sequence[str] = DEFAULT_EXCLUDES,
    pip: Sequence[str] = (),
    uv: Sequence[str] = (),
) -> dict[str, Any]:
    """The job's runtime env: the project as working_dir (minus `excludes`), the env vars, and
    optionally packages Ray installs into a per-job virtualenv (`pip` or `uv`, not both)."""
    if pip and uv:
        raise ValueError("--pip and --uv are exclusive: Ray installs with one of them")
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(excludes), "env_vars": dict(env_vars)}
    if pip:
        runtime_env["pip"] = list(pip)
    if uv:
        runtime_env["uv"] = list(uv)
    return runtime_env


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings to a dict; a pair without `=` is an error naming it."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--env expects KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def job_env(user_env: dict[str, str]) -> dict[str, str]:
    """The env vars the job gets: unbuffered output (logs arrive as they are written), the data
    folder forwarded from this machine, then the user's, which win."""
    return {"PYTHONUNBUFFERED": "1", "ALIGN_DATA_DIR": shared_data_dir(), **user_env}


def follow(client, job_id: str, *, timeout: float | None = None, out: TextIO = sys.stdout, poll_s: float = 1.0):
    """Stream the job's logs to `out` until it ends; return its final `JobStatus`, or None when
    `timeout` seconds ran out first."""
    deadline = None if timeout is None else time.monotonic() + timeout

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    try:
        asyncio.run(asyncio.wait_for(tail(), None if deadline is None else max(0.0, deadline - time.monotonic())))
    except asyncio.TimeoutError:
        return None
    except Exception as err:  # the log stream is a websocket; a proxy may refuse it. Poll instead.
        print(f"align.launch: log streaming failed ({err}); polling the job status", file=sys.stderr)
        return _poll_then_print(client, job_id, deadline, out, poll_s)
    # The stream closes when the job's driver exits; the status may lag it by a moment.
    return _poll_then_print(client, job_id, deadline, None, poll_s)


def _poll_then_print(client, job_id, deadline, out, poll_s):
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            if out is not None:
                out.write(client.get_job_logs(job_id))
                out.flush()
            return status
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(poll_s)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m align.launch",
        description="Submit `python -m align <overrides>` to a Ray cluster as a Ray job.",
        epilog="Example: python -m align.launch --address http://127.0.0.1:8265 -- algo=sft output_dir=/shared/runs/a",
    )
    parser.add_argument("--address", default=None,
                        help=f"the cluster's dashboard (Jobs API) address; default $RAY_API_SERVER_ADDRESS, else {DEFAULT_ADDRESS}")
    parser.add_argument("--working-dir", default=str(REPO_ROOT), help="uploaded as the job's working dir (default: the project root)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="another gitignore-style pattern to leave out of the upload (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="an env var for the job (repeatable)")
    parser.add_argument("--pip", action="append", default=[], metavar="PKG", help="install PKG into a per-job virtualenv (repeatable)")
    parser.add_argument("--uv", action="append", default=[], metavar="PKG", help="as --pip, installed with uv")
    parser.add_argument("--python", default="python", help="the interpreter the entrypoint runs (default: python on the cluster's PATH)")
    parser.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the job's driver")
    parser.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the job's driver")
    parser.add_argument("--job-id", default=None, help="the submission id (default: Ray picks one)")
    wait = parser.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_true", default=True, help="follow the job and print its logs (default)")
    wait.add_argument("--no-wait", dest="wait", action="store_false", help="submit, print the job id and return")
    parser.add_argument("--timeout", type=float, default=None, help="seconds to follow the job before giving up (exit 124)")
    parser.add_argument("--dry-run", action="store_true", help="print the entrypoint and runtime env as JSON; submit nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. algo=sft trainer.max_steps=100")
    return parser.parse_intermixed_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runtime_env = build_runtime_env(
            args.working_dir,
            job_env(parse_env(args.env)),
            excludes=[*DEFAULT_EXCLUDES, *args.exclude],
            pip=args.pip,
            uv=args.uv,
        )
    except ValueError as err:
        print(f"align.launch: {err}", file=sys.stderr)
        return 2
    entrypoint = build_entrypoint(args.overrides, args.python)
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS
    if args.dry_run:
        print(json.dumps({"address": address, "entrypoint": entrypoint, "runtime_env": runtime_env}, indent=2))
        return EXIT_OK
    if not any(o.lstrip("+").startswith("output_dir=") for o in args.overrides):
        print("align.launch: no output_dir= override: the run writes into the job's temporary working dir, "
              "which Ray deletes; pass output_dir=/a/shared/path to keep it", file=sys.stderr)

    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=args.job_id,
            entrypoint_num_cpus=args.num_cpus,
            entrypoint_num_gpus=args.num_gpus,
        )
    except Exception as err:  # connection refused, auth, a bad runtime env: one line, then exit
        hint = ""
        if "auth" in str(err).lower():
            hint = " (a token-auth head: run with RAY_AUTH_MODE=token and its token in ~/.ray/auth_token or $RAY_AUTH_TOKEN)"
        print(f"align.launch: could not submit to {address}: {err}{hint}", file=sys.stderr)
        return EXIT_FAILED
    print(f"align.launch: submitted {job_id} to {address}: {entrypoint}", file=sys.stderr)
    if not args.wait:
        print(job_id)
        return EXIT_OK

    status = follow(client, job_id, timeout=args.timeout)
    if status is None:
        print(f"align.launch: {job_id} still running after {args.timeout:g} s; left running "
              f"(follow: ray job logs -f {job_id} --address {address})", file=sys.stderr)
        return EXIT_TIMEOUT
    message = client.get_job_info(job_id).message or ""
    print(f"align.launch: {job_id} {status.value}{': ' + message if message else ''}", file=sys.stderr)
    return EXIT_OK if status.value == "SUCCEEDED" else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
