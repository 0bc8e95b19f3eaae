"""`WorkerGroup`: N data-parallel replicas of a `ModelWorker` as Ray actors, and `Placement`:
which group serves which role.

    group = WorkerGroup("model", spec, num_replicas=2, num_cpus=1)
    shards = group.map("generate", per_rank_args)        # one call per replica, in parallel
    out = group.call("save", path)                       # the same call on every replica

A replica that dies (killed, out of memory, a crash) surfaces as `WorkerDiedError` naming the
worker, its pid and host and the verb it was running, never as a hang or a bare Ray trace; when
the process itself crashed (a segfault, an abort), the message also gives its log file and what
the crash printed there (the signal and Python's stack at the time, which Ray does not forward).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from align.workers.batch import Experience
from align.workers.worker import ModelWorker, ScorerWorker, WorkerSpec


def init_local_ray(num_cpus: int | None = None, include_dashboard: bool = False,
                   attempts: int = 3) -> Callable[[], None]:
    """`ray.init(address="local", ...)`, retried: Ray gives its raylet a fixed 30 s to register,
    which a heavily loaded machine can miss ("The current node timed out during startup").

    Returns `shutdown`, which stops this Ray. A watchdog process (align/lifecycle.py) ends the
    cluster's processes should this process die without calling it (SIGKILL, OOM)."""
    import logging
    import time

    import ray

    from align.lifecycle import watch_ray_session

    for attempt in range(1, attempts + 1):
        try:
            context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=include_dashboard,
                               logging_level=logging.WARNING)
            break
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            ray.shutdown()
            time.sleep(2.0)
    watchdog = watch_ray_session(context.address_info["session_dir"])

    def shutdown() -> None:
        ray.shutdown()
        watchdog.release()

    return shutdown


class WorkerDiedError(RuntimeError):
    """A worker process died or a verb raised inside it; the message names the worker."""


class WorkerGroup:
    """`num_replicas` Ray actors hosting the same model, joined by torch.distributed when N > 1.

    Each actor reserves `num_cpus` CPUs and `num_gpus` GPUs and is named `<run>/<name>-<rank>`
    (visible in `ray list actors`). `worker_cls`: `ModelWorker`, or `ScorerWorker` for a reward
    model with a base of its own. distributed: join the replicas in a process group (False: they
    work independently, as rollout workers do). concurrency_groups: Ray concurrency groups of
    the actors (methods called with `.options(concurrency_group=...)` run in their own threads).
    """

    def __init__(self, name: str, spec: WorkerSpec, *, num_replicas: int = 1, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, run_id: str = "align", start_timeout_s: float = 300.0,
                 worker_cls: type = ModelWorker, distributed: bool = True,
                 concurrency_groups: dict[str, int] | None = None):
        import ray

        self.name = name
        self.size = num_replicas
        threads = max(1, int(num_cpus))
        extra = {"concurrency_groups": concurrency_groups} if concurrency_groups else {}
        actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
                               **extra)(worker_cls)
        env = worker_env(threads)
        # Independent workers (distributed=False) are each a world of one: no process group, nothing
        # sharded, no rank built on the meta device waiting for a rank 0 that never sends.
        world = num_replicas if distributed else 1
        self.actors = [
            actor_cls.options(name=f"{run_id}/{name}-{rank}", runtime_env={"env_vars": env}).remote(
                _with_threads(spec, threads), name=f"{name}-{rank}", rank=rank, world_size=world
            )
            for rank in range(num_replicas)
        ]
        self.workers_info = [{"name": f"{name}-{rank}", "rank": rank} for rank in range(num_replicas)]
        self.workers_info = self._get([a.info.remote() for a in self.actors], "start", timeout=start_timeout_s)
        if num_replicas > 1 and distributed:
            addr, port = self._get([self.actors[0].rendezvous_address.remote()], "rendezvous")[0]
            self._get([a.init_distributed.remote(addr, port) for a in self.actors], "init_distributed")

    # ---- calling ---------------------------------------------------------------------------------
    def call(self, method: str, *args, **kwargs) -> list[Any]:
        """The same call on every replica; returns their results in rank order."""
        return self._get(self.call_async(method, *args, **kwargs), method)

    def call_async(self, method: str, *args, **kwargs) -> list:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def map_async(self, method: str, per_rank: Sequence[tuple], **kwargs) -> list:
        """Replica i gets `per_rank[i]` as its positional arguments."""
        return [getattr(a, method).remote(*args, **kwargs) for a, args in zip(self.actors, per_rank)]

    def map(self, method: str, per_rank: Sequence[tuple], **kwargs) -> list[Any]:
        return self._get(self.map_async(method, per_rank, **kwargs), method)

    def shard(self, batch: Experience) -> list[Experience]:
        """Consecutive shards of `batch`, one per replica."""
        return batch.chunk(self.size)

    def get(self, refs: list, method: str) -> list[Any]:
        return self._get(refs, method)

    def _get(self, refs: list, method: str, timeout: float | None = None) -> list[Any]:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            # One replica's failure leaves the others waiting in a collective for it: surface the
            # first error as soon as it exists instead of waiting for every result.
            pending, deadline = list(refs), None if timeout is None else time.monotonic() + timeout
            while pending:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                done, pending = ray.wait(pending, num_returns=1, timeout=left)
                if not done:
                    raise GetTimeoutError(f"{len(pending)} results not ready")
                ray.get(done[0])
            return ray.get(refs)
        except RayActorError as err:
            who, info = self._who(err, refs)
            raise WorkerDiedError(f"{who} died while running {method!r}: {_first_line(err)}"
                                  f"{crash_report(info)}") from err
        except RayTaskError as err:
            raise WorkerDiedError(f"{self._who(err, refs)[0]} failed in {method!r}: {_first_line(err)}") from err
        except GetTimeoutError as err:
            raise WorkerDiedError(f"worker group {self.name!r} did not answer {method!r} within {timeout} s "
                                  "(not enough free CPUs/GPUs for its actors?)") from err

    def _who(self, err, refs) -> tuple[str, dict]:
        """Name the replica that failed, the first one whose result is an error, and give what it
        reported at start (`ModelWorker.info`)."""
        import ray

        for info, ref in zip(self.workers_info, refs):
            ready, _ = ray.wait([ref], timeout=0)
            if ready:
                try:
                    ray.get(ref)
                except Exception:
                    pid = f", pid {info['pid']}" if "pid" in info else ""
                    host = f", host {info['host']}" if "host" in info else ""
                    return f"worker {info['name']} (group {self.name!r}{pid}{host})", info
        return f"a worker of group {self.name!r}", {}

    def kill(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already dead
                pass


def worker_env(threads: int) -> dict[str, str]:
    """The environment of a Ray worker of ours: `threads` CPU threads for torch (OpenMP), no
    tokenizer thread pool, and Arrow's jemalloc without its background thread (see
    `align.lifecycle.ARROW_JEMALLOC_ENV`)."""
    from align.lifecycle import ARROW_JEMALLOC_ENV

    return {"OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", **ARROW_JEMALLOC_ENV}


def _with_threads(spec: WorkerSpec, threads: int) -> WorkerSpec:
    from dataclasses import replace

    return replace(spec, num_threads=threads)


def own_log() -> str | None:
    """The file this process's stderr goes to (a Ray worker's `worker-*.err` under the session's
    logs folder), or None when it is not a file (a terminal, a pipe) or cannot be told."""
    try:
        path = os.readlink("/proc/self/fd/2")
    except OSError:  # not Linux
        return None
    return path if os.path.isfile(path) else None


# How a dying process starts telling it on its stderr: Ray's and Python's signal handlers, a C++
# abort, glibc's heap checks. What follows is kept when it matches _DETAIL: the native frame
# (Ray's handler), the top native frames, the Python stack (faulthandler).
_CRASH = re.compile(r"\*\*\* SIG[A-Z]+ received|Fatal Python error|terminate called|double free|corrupted|malloc\(\)")
_DETAIL = re.compile(r"PC: @|^@ |most recent call first|^File \"")


def crash_report(info: dict, max_bytes: int = 64_000, max_lines: int = 16, native_frames: int = 3) -> str:
    """For a worker that died: its log file (`info["log"]`, reported at start) and, where that
    file is on this machine, the crash it printed last (the signal, the native frames, the
    Python stack of the crashing thread). Empty when the worker reported no log."""
    path = info.get("log")
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - max_bytes))
            tail = f.read().decode("utf-8", "replace").splitlines()
    except OSError:  # on another node
        return f"; its log: {path} on host {info.get('host', '?')}"
    tail = [re.sub(r"^\[[^\]]*\] logging\.cc:\d+: ", "", line).strip() for line in tail]  # Ray's copies
    marks = [i for i, line in enumerate(tail) if _CRASH.search(line)]
    if not marks:  # SIGKILL (the out-of-memory killer, `kill -9`) leaves nothing
        return f"; its log {path} (no crash report in it)"
    first = len(marks) - 1  # the last crash's first line: marks less than a native stack apart
    while first > 0 and marks[first] - marks[first - 1] <= 64:
        first -= 1
    lines: list[str] = []
    frames = 0
    for line in tail[marks[first]:]:
        if line in lines or not (_CRASH.search(line) or _DETAIL.search(line)):
            continue
        if line.startswith("@ "):
            frames += 1
            if frames > native_frames:
                continue
        lines.append(line)
    return f"; its log {path}: " + " | ".join(lines[:max_lines])


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[-1][:300] if text else type(err).__name__


@dataclass
class Placement:
    """Which worker group serves each role.

    colocated: one group hosts actor, reference, critic and reward on one shared model, so the
    driver's fused passes (`annotate`) run every role in one forward. split: an actor group
    (actor + reference + rollout), a critic group, a reward group, each with its own workers
    (and GPUs); their passes run concurrently. rollout: with `rollout.mode=async`, the dedicated
    rollout group (engines over copies of the actor that take published weights); not one of
    `unique_groups` (it holds no state a checkpoint keeps).
    """

    groups: dict[str, WorkerGroup]  # role -> group (the same object for every role when colocated)
    rollout: WorkerGroup | None = None

    @property
    def actor(self) -> WorkerGroup:
        return self.groups["actor"]

    def group(self, role: str) -> WorkerGroup:
        return self.groups["actor" if role == "reference" else role]

    def unique_groups(self) -> list[WorkerGroup]:
        seen = []
        for g in self.groups.values():
            if all(g is not s for s in seen):
                seen.append(g)
        return seen

    def annotate(self, batch: Experience, roles: Sequence[str]) -> Experience:
        """Fill `ROLE_FIELDS[role]` for each role: every group runs its roles on its shards of
        the batch, all groups at once; returns the batch with those fields set."""
        by_group: list[tuple[WorkerGroup, list[str]]] = []
        for role in roles:
            g = self.group(role)
            for entry in by_group:
                if entry[0] is g:
                    entry[1].append(role)
                    break
            else:
                by_group.append((g, [role]))
        pending = []
        for g, group_roles in by_group:
            shards = g.shard(batch)
            pending.append((g, g.map_async("annotate", [(s, tuple(group_roles)) for s in shards])))
        fields = {}
        for g, refs in pending:
            import torch

            results = g.get(refs, "annotate")
            for key in results[0]:
                fields[key] = torch.cat([r[key] for r in results])
        return batch.replace(**fields)

    def kill(self) -> None:
        for g in self.unique_groups() + ([self.rollout] if self.rollout is not None else []):
            g.kill()


def gpus_per_worker(cluster, model, ray_gpus: float) -> float:
    """GPUs each worker asks Ray for. Ray hides every GPU from an actor that asks for none
    (CUDA_VISIBLE_DEVICES is emptied), so a CUDA model must ask: `cluster.num_gpus_per_worker`
    when set, else 1 when `model.device` is cuda, or auto with GPUs in the cluster (`ray_gpus`,
    Ray's GPU resource), else 0. A CUDA model on a cluster without GPUs, or with 0 GPUs per worker,
    is refused here rather than silently run on the CPU."""
    from align.config import ConfigError

    wants_cuda = str(model.device).startswith("cuda")
    if wants_cuda and ray_gpus <= 0:
        raise ConfigError(f"model.device={model.device}: the Ray cluster shows no GPUs (its GPU resource is "
                          f"{ray_gpus:g}); start Ray on GPU nodes, or set model.device=cpu")
    gpus = cluster.num_gpus_per_worker
    if gpus is None:
        gpus = 1.0 if wants_cuda or (model.device == "auto" and ray_gpus > 0) else 0.0
    if wants_cuda and gpus <= 0:
        raise ConfigError(f"cluster.num_gpus_per_worker={gpus:g} with model.device={model.device}: Ray would hide "
                          "every GPU from the workers; leave it null (1 per worker) or give a fraction > 0")
    return float(gpus)


def build_placement(spec: WorkerSpec, roles: Sequence[str], cluster, run_id: str) -> Placement:
    """Worker groups for `roles` under `cluster.placement` (colocated or split)."""
    from dataclasses import replace

    import ray

    from align.models.scorer import reward_model_kind

    num_gpus = gpus_per_worker(cluster, spec.model, float(ray.cluster_resources().get("GPU", 0)))
    kw = dict(num_replicas=cluster.num_replicas, num_cpus=cluster.num_cpus_per_worker,
              num_gpus=num_gpus, run_id=run_id, start_timeout_s=cluster.worker_start_timeout_s)
    if cluster.placement == "colocated":
        group = WorkerGroup("model", replace(spec, roles=tuple(roles)), **kw)
        return Placement({role: group for role in (*roles, "reward")})
    def role_spec(role: str) -> WorkerSpec:
        # the critic group loads the reward model only to initialise the critic from it
        from_reward = spec.critic_init_from_reward and role == "critic"
        needs_rm = role == "reward" or from_reward
        return replace(spec, roles=(role,), critic_init_from_reward=from_reward,
                       reward_model_path=spec.reward_model_path if needs_rm else None)

    if spec.reward_model_path:
        roles = (*roles, "reward")
    def worker_cls(role: str) -> type:
        # a reward model with a base of its own: its workers load only that classifier
        if role == "reward" and reward_model_kind(spec.reward_model_path) == "classifier":
            return ScorerWorker
        return ModelWorker

    groups = {role: WorkerGroup(role, role_spec(role), worker_cls=worker_cls(role), **kw) for role in roles}
    rollout = None
    if spec.rollout.mode == "async":
        # generation only: the actor (its optimizer state is never touched), no reward model, no process group
        kw["num_replicas"] = cluster.num_rollout_replicas
        # partial rollouts: weight updates run in a thread of their own, beside the generation
        groups_kw = {"concurrency_groups": {"weights": 1}} if spec.rollout.partial_rollouts else {}
        rollout = WorkerGroup("rollout", replace(role_spec("actor"), roles=("actor",)), distributed=False,
                              **kw, **groups_kw)
    return Placement(groups, rollout)
