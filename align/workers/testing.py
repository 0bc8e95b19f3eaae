"""A local Ray cluster for tests and scripts: `with local_ray(num_cpus=2) as address: ...`."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def local_ray(num_cpus: int = 2) -> Iterator[str]:
    """Start an in-process Ray cluster without the dashboard (or reuse the one already running in
    this process) and yield its GCS address, which a subprocess driver can join with
    `cluster.address=<address>`. Shuts down only a cluster it started."""
    import ray

    from align.workers.group import init_local_ray

    shutdown = None if ray.is_initialized() else init_local_ray(num_cpus=num_cpus, include_dashboard=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        if shutdown is not None:
            shutdown()
