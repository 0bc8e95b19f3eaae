"""One stage on N Ray workers: the same trainer in every worker, joined by a process group.

    python -m align algo=sft trainer.strategy=fsdp2 cluster.num_replicas=2

`run_replicated(cfg)` starts `cluster.num_replicas` `StageWorker` actors (each asking Ray for
`cluster.num_cpus_per_worker` CPUs and its GPUs), joins them in a torch.distributed group (gloo
on CPU, NCCL on CUDA, rendezvous on rank 0's node) and runs the stage's own `train(cfg)` in
each: single-program, multiple-data, as torchrun would, so SFT, RM and DPO/KTO keep one driver
that reads as the algorithm. Inside, `align.engine.distributed` tells a trainer its rank: every
replica reads the same data in the same order and takes its share of each step's examples; the
engine reduces gradients; rank 0 alone writes the run directory, metrics, checkpoints and the
final model. Returns rank 0's summary.

The RL stages run their own worker groups (`align.workers`), not this.
"""

from __future__ import annotations

import os
from typing import Any, Sequence


class StageWorker:
    """A Ray actor running one replica of an in-process stage."""

    def __init__(self, rank: int, world_size: int, threads: int):
        self.rank, self.world_size = rank, world_size
        import torch

        torch.set_num_threads(max(1, threads))

    def info(self) -> dict:
        """Its rank, pid, host and log file (`worker_info`; named when it dies: `crash_report`)."""
        from align.workers.worker import worker_info

        return worker_info(f"replica-{self.rank}", self.rank, [])

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def run(self, master_addr: str, master_port: int, cfg, hydra_cfg=None) -> dict:
        import torch
        import torch.distributed as dist

        from align.engine import distributed
        from align.trainers import run

        cuda = torch.cuda.is_available() and str(cfg.model.device) != "cpu"
        if cuda:
            torch.cuda.set_device(0)  # Ray gives each worker its own GPU(s), visible from index 0
        dist.init_process_group(distributed.backend(cuda), init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world_size)
        try:
            return run(cfg, hydra_cfg if self.rank == 0 else None)
        finally:
            dist.destroy_process_group()


def run_replicated(cfg, hydra_cfg=None) -> dict:
    """Run the stage `cfg.algo.name` on `cfg.cluster.num_replicas` Ray workers; rank 0's summary."""
    import ray

    from align.trainers.rl import init_ray
    from align.workers.group import WorkerDiedError, gpus_per_worker, worker_env

    cluster = cfg.cluster
    shutdown = init_ray(cluster)
    try:
        num_gpus = gpus_per_worker(cluster, cfg.model, float(ray.cluster_resources().get("GPU", 0)))
        threads = max(1, int(cluster.num_cpus_per_worker))
        env = {**worker_env(threads), "ALIGN_REPLICA_OF": cfg.algo.name}
        if os.environ.get("ALIGN_DATA_DIR"):
            env["ALIGN_DATA_DIR"] = os.environ["ALIGN_DATA_DIR"]
        actor_cls = ray.remote(num_cpus=cluster.num_cpus_per_worker, num_gpus=num_gpus, max_restarts=0)(StageWorker)
        n = cluster.num_replicas
        actors = [actor_cls.options(name=f"{cfg.algo.name}-{r}", runtime_env={"env_vars": env}).remote(r, n, threads)
                  for r in range(n)]
        if hydra_cfg is not None:  # resolved here: the replicas have no Hydra context or resolvers
            from omegaconf import OmegaConf

            resolved = OmegaConf.to_container(hydra_cfg, resolve=True)
            resolved.pop("hydra", None)
            hydra_cfg = OmegaConf.create(resolved)
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=cluster.worker_start_timeout_s)
            addr, port = ray.get(actors[0].rendezvous_address.remote(), timeout=cluster.worker_start_timeout_s)
            refs = [a.run.remote(addr, port, cfg, hydra_cfg) for a in actors]
            summary = _first_result(refs, cfg.algo.name, infos)[0]
            # rank 0's own closing line travels through Ray's log forwarding, which may not flush in time
            print(f"{cfg.algo.name} done on {n} replicas ({cfg.trainer.strategy}); outputs in {cfg.output_dir}", flush=True)
            return summary
        finally:
            for a in actors:
                ray.kill(a, no_restart=True)
    except ray.exceptions.GetTimeoutError as err:
        raise WorkerDiedError(f"{cfg.algo.name}: the replicas did not start within "
                              f"{cluster.worker_start_timeout_s} s (not enough free CPUs/GPUs?)") from err
    finally:
        if shutdown is not None:
            shutdown()


# A replica that fails leaves the others failing in their next collective; name the cause.
_PEER_FAILURE = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def _first_result(refs: list, stage: str, infos: Sequence[dict]) -> list[Any]:
    """Every replica's result. When one fails the others fail in their next collective, so the
    error raised is the cause: the first replica (in rank order) whose error is not a peer's
    failure, raised as its own type (a ConfigError, a DataError naming the line); a replica whose
    process died is named with its pid and what its log says (`infos`: `StageWorker.info`)."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from align.workers.group import WorkerDiedError, crash_report

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except (RayTaskError, RayActorError):
            ray.wait(refs, num_returns=len(refs), timeout=10.0)  # let the others report
            errors = []
            for rank, ref in enumerate(refs):
                try:
                    ray.get(ref, timeout=0)
                except (RayTaskError, RayActorError) as err:
                    errors.append((rank, err))
                except Exception:  # still running
                    continue
            rank, err = next(((r, e) for r, e in errors if not any(m in str(e) for m in _PEER_FAILURE)), errors[0])
            if isinstance(err, RayActorError):
                info = infos[rank]
                raise WorkerDiedError(f"{stage} replica {rank} (pid {info['pid']}, host {info['host']}) died: "
                                      f"{str(err).strip().splitlines()[0][:300]}{crash_report(info)}") from err
            raise err.as_instanceof_cause() from None
    return ray.get(refs)
