"""Run a stage as N data-parallel replicas in spawned processes joined by gloo, as the Ray
workers of `align.engine.spmd` do (same trainer code, no Ray start-up), and read what it wrote."""

from __future__ import annotations

import os
import socket
import sys

import torch.multiprocessing as mp


def _replica(rank: int, world: int, port: int, overrides: list[str], env: dict) -> None:
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from align.config import compose
        from align.trainers import run

        cfg, raw = compose(overrides)
        run(cfg, raw if rank == 0 else None)
    finally:
        dist.destroy_process_group()


def run_replicas(overrides: list[str], world: int = 2) -> None:
    """`python -m align <overrides>` as `world` replicas (the overrides should set
    trainer.strategy and cluster.num_replicas); raises if any replica fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k.startswith("ALIGN_")}
    sys.stdout.flush()
    mp.start_processes(_replica, args=(world, port, list(overrides), env), nprocs=world, start_method="spawn")

