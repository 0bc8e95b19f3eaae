"""A worker process that crashes (a segfault, an abort) tells why only on its own stderr, a file
in Ray's session logs that the driver never shows: `WorkerDiedError` names that file and quotes
the crash (the signal, the native frame, the crashing thread's Python stack)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from align.workers.group import crash_report, worker_env


def test_worker_env_keeps_arrow_jemalloc_background_thread_off():
    assert worker_env(3) == {"OMP_NUM_THREADS": "3", "TOKENIZERS_PARALLELISM": "false",
                             "JE_ARROW_MALLOC_CONF": "background_thread:false"}

# The end of a Ray worker's .err as it died in CI (stop 24): earlier noise, a handled traceback,
# then Ray's signal handler (each line twice: raw and through Ray's logger) and faulthandler.
LOG = """\
:job_id:01000000
:actor_name:ModelWorker
Traceback (most recent call last):
  File "/x/align/models/loading.py", line 12, in load
    raise ValueError("handled")
ValueError: handled
/x/torch/distributed/fsdp/_fully_shard/_fsdp_state.py:331: UserWarning: FSDP2-wrapped module (FSDP_Root) returned a view
  output = self._register_pre_backward_hook(output)
*** SIGSEGV received at time=1796611497 on cpu 0 ***
PC: @     0x7f44956b6a97  (unknown)  __libc_malloc
    @     0x7f449565a050  (unknown)  (unknown)
[2026-12-07 02:44:57,938 E 20853 20919] logging.cc:474: *** SIGSEGV received at time=1796611497 on cpu 0 ***
[2026-12-07 02:44:57,938 E 20853 20919] logging.cc:474: PC: @     0x7f44956b6a97  (unknown)  __libc_malloc
[2026-12-07 02:44:57,938 E 20853 20919] logging.cc:474:     @     0x7f449565a050  (unknown)  (unknown)
Fatal Python error: Segmentation fault

Current thread 0x00007f4495c3f740 (most recent call first):
  File "/x/align/engine/engine.py", line 385 in full_tensor
  File "/x/align/workers/worker.py", line 631 in export_actor

Extension modules: msgpack._cmsgpack, torch._C (total: 2)
"""


def test_crash_report_quotes_the_last_crash_once(tmp_path):
    log = tmp_path / "worker-1-01000000-20853.err"
    log.write_text(LOG)
    report = crash_report({"log": str(log), "host": "vm"})
    assert report.startswith(f"; its log {log}: ")
    said = report.split(": ", 1)[1].split(" | ")
    assert said == ["*** SIGSEGV received at time=1796611497 on cpu 0 ***",
                    "PC: @     0x7f44956b6a97  (unknown)  __libc_malloc",
                    "@     0x7f449565a050  (unknown)  (unknown)",
                    "Fatal Python error: Segmentation fault",
                    "Current thread 0x00007f4495c3f740 (most recent call first):",
                    'File "/x/align/engine/engine.py", line 385 in full_tensor',
                    'File "/x/align/workers/worker.py", line 631 in export_actor']
    # a worker killed outright (SIGKILL: the out-of-memory killer) prints nothing
    quiet = tmp_path / "quiet.err"
    quiet.write_text(LOG.split("*** SIGSEGV")[0])
    assert crash_report({"log": str(quiet)}) == f"; its log {quiet} (no crash report in it)"
    # a log on another node is named with its host; no log reported, nothing said
    assert crash_report({"log": "/elsewhere/w.err", "host": "node-7"}) == "; its log: /elsewhere/w.err on host node-7"
    assert crash_report({}) == ""


@pytest.mark.slow
def test_segfaulted_worker_is_named_with_its_log_and_crash(ray_cluster, stories_path):
    """A real worker process runs without Arrow's jemalloc background thread (a known source of
    random segfaults, `align.lifecycle.ARROW_JEMALLOC_ENV`); crashed by SIGSEGV, the next call
    raises `WorkerDiedError` naming it, its log file (reported at start, under Ray's session
    logs) and the segfault."""
    from align.config import ModelConfig, TrainerConfig
    from align.workers.group import WorkerDiedError, WorkerGroup
    from align.workers.worker import WorkerSpec

    spec = WorkerSpec(model=ModelConfig(name_or_path=stories_path), trainer=TrainerConfig(), roles=("actor",))
    group = WorkerGroup("crash", spec, num_replicas=1, run_id="test-crash")
    try:
        info = group.workers_info[0]
        assert info["log"] and os.path.isfile(info["log"]) and info["log"].endswith(".err"), info
        # pyarrow is loaded in a worker (datasets), but not its jemalloc's background thread
        proc = Path(f"/proc/{info['pid']}")
        assert "libarrow" in (proc / "maps").read_text()
        threads = {(t / "comm").read_text().strip() for t in (proc / "task").iterdir()}
        assert "jemalloc_bg_thd" not in threads, threads
        os.kill(info["pid"], signal.SIGSEGV)
        with pytest.raises(WorkerDiedError) as err:
            group.call("info")
    finally:
        group.kill()
    message = str(err.value)
    assert "worker crash-0" in message and str(info["pid"]) in message and "died while running 'info'" in message
    assert f"its log {info['log']}: " in message
    assert "SIGSEGV received" in message and "Fatal Python error: Segmentation fault" in message
