"""One local Ray cluster (2 CPUs, no dashboard) for the whole session, shared with
tests/workers (whichever directory runs first starts it)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_cluster() -> str:
    """The cluster's GCS address (subprocess drivers join it with cluster.address=...)."""
    from align.workers.testing import local_ray

    with local_ray(num_cpus=2) as address:
        yield address
