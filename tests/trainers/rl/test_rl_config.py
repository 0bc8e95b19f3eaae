"""GRPO/PPO configuration: the shipped configs compose, and bad values fail naming the key."""

from __future__ import annotations

import pytest

from align.config import ConfigError, GRPOConfig, PPOConfig, compose


def test_shipped_rl_configs_compose_with_lora_story_prompts_and_a_held_out_split():
    for algo, schema in (("grpo", GRPOConfig), ("ppo", PPOConfig)):
        cfg, _ = compose([f"algo={algo}"])
        assert isinstance(cfg.algo, schema)
        assert cfg.model.finetune == "lora" and cfg.data.format == "prompt"
        assert cfg.data.source.endswith("configs/data/story_prompts.jsonl") and cfg.data.val_size == 32
    # the command line still wins over an algorithm's defaults
    cfg, _ = compose(["algo=grpo", "model=stories260k"])
    assert cfg.model.finetune == "full"


@pytest.mark.parametrize("kwargs, key", [
    ({"advantage_estimator": "ppo"}, "algo.advantage_estimator"),
    ({"num_generations": 1}, "algo.num_generations"),
    ({"minibatch_size": 5}, "algo.minibatch_size"),  # 8 prompts x 8 samples = 64 rows
    ({"loss_agg": "mean"}, "algo.loss_agg"),
    ({"kl_kind": "k4"}, "algo.kl_kind"),
    ({"dual_clip": 1.0}, "algo.dual_clip"),
    ({"entropy_coef": -0.01}, "algo.entropy_coef"),
])
def test_bad_grpo_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        GRPOConfig(**kwargs)


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="dr_grpo.*grpo.*reinforce_pp.*rloo"):
        GRPOConfig(advantage_estimator="vanilla")


@pytest.mark.parametrize("kwargs, key", [
    ({"kl_controller": "pid"}, "algo.kl_controller"),
    ({"lam": 1.5}, "algo.lam"),
    ({"critic_lr": 0.0}, "algo.critic_lr"),
])
def test_bad_ppo_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        PPOConfig(**kwargs)


def test_vllm_rollout_without_vllm_fails_before_any_worker_starts(tmp_path):
    """Where vLLM is not installed, rollout=vllm is refused up front, naming the key and the
    install (the run with vLLM is tests/vllm_backend/test_vllm_rl.py)."""
    import importlib.util

    from align.config import ConfigError, compose
    from align.trainers.rl import RLRun

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    cfg, raw = compose(["algo=grpo", "rollout=vllm", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"rollout.backend=vllm.*pip install"):
        RLRun(cfg, raw, roles=("actor",), headline=("reward/mean",))
