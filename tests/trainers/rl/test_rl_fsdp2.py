"""GRPO and PPO end to end with 2 FSDP2-sharded replicas per worker group (gloo on CPU): the
rollout copy is refreshed from gathered shards (the engine samples as the trainer scores), the
sharded checkpoint is written and a rerun resumes from it. That the sharded updates equal one
replica's is tests/workers/test_data_parallel.py."""

from __future__ import annotations

import math

import pytest

from align.config import ConfigError, compose
from align.trainers.metrics import read_metrics

COMMON = ["algo.rollout_batch_size=2", "algo.num_generations=4", "algo.eval_prompts=2", "rollout.max_new_tokens=10",
          "trainer.eval_every=3", "trainer.save_every=2", "trainer.progress=false", "seed=3",
          "trainer.strategy=fsdp2", "cluster.num_replicas=2"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_sharded_rl_run_syncs_checkpoints_and_resumes(ray_cluster, tmp_path, algo):
    from align.trainers import run

    extra = ["algo.minibatch_size=4"] if algo == "ppo" else []
    overrides = [f"algo={algo}", *COMMON, *extra, f"cluster.address={ray_cluster}", f"output_dir={tmp_path}"]
    cfg, raw = compose([*overrides, "trainer.max_steps=2"])
    run(cfg, raw)
    assert (tmp_path / "checkpoints" / "step_2" / "workers" / "model" / "actor" / "adapter_model.safetensors").exists()
    cfg, raw = compose([*overrides, "trainer.max_steps=3"])
    summary = run(cfg, raw)  # resume=auto: from the sharded step-2 checkpoint
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert math.isfinite(r["actor/loss"]) and r["actor/grad_norm"] > 0
        # the merged rollout copy, rebuilt from gathered shards after every update, samples as
        # the sharded actor scores: a stale or half-gathered copy would show here
        assert r["actor/mismatch/abs_logp_diff"] < 1e-4, r["actor/mismatch/abs_logp_diff"]
    if algo == "ppo":
        assert all(math.isfinite(r["critic/vf_loss"]) for r in rows[1:])
    assert summary["export_dir"]


def test_sharded_rl_refuses_generating_through_the_shards():
    with pytest.raises(ConfigError, match=r"trainer\.strategy=fsdp2 runs the RL workers' model as FSDP2 units"):
        compose(["algo=grpo", "trainer.strategy=fsdp2", "cluster.num_replicas=2", "rollout.merged_copy=false"])
    with pytest.raises(ConfigError, match=r"use LoRA with rollout\.merged_copy=true"):
        compose(["algo=grpo", "trainer.strategy=fsdp2", "cluster.num_replicas=2", "model.finetune=full"])
    # ddp's replicas are whole, but their parameters are FSDP2 DTensors too
    with pytest.raises(ConfigError, match=r"trainer\.strategy=ddp runs the RL workers' model as FSDP2 units"):
        compose(["algo=grpo", "trainer.strategy=ddp", "cluster.num_replicas=2", "model.finetune=full"])
