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


@pytest.mark.parametrize("kwargs, key", [
    ({"policy_loss": "trpo"}, "algo.policy_loss"),
    ({"rollout_correction": "is"}, "algo.rollout_correction"),
    ({"rollout_correction_level": "geo"}, "algo.rollout_correction_level"),
    ({"rollout_correction_cap": 0.0}, "algo.rollout_correction_cap"),
    ({"policy_loss": "gspo", "dual_clip": 3.0}, "algo.dual_clip"),
    ({"policy_loss": "cispo", "clip_eps_low": 1.5}, "algo.clip_eps_low"),
])
def test_bad_policy_loss_and_correction_values_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        GRPOConfig(**kwargs)


def test_dr_grpo_is_a_whole_recipe():
    """algo=dr_grpo selects both halves of Dr. GRPO (no std in the advantage, a constant length
    normaliser); the advantage alone with a length-normalised loss is refused, pointing there."""
    cfg, _ = compose(["algo=dr_grpo"])
    assert cfg.algo.name == "grpo"
    assert (cfg.algo.advantage_estimator, cfg.algo.loss_agg) == ("dr_grpo", "seq-mean-token-sum-norm")
    with pytest.raises(ConfigError, match="algo=dr_grpo"):
        compose(["algo=grpo", "algo.advantage_estimator=dr_grpo"])


def test_gspo_and_cispo_presets_carry_their_papers_settings():
    gspo, _ = compose(["algo=gspo"])
    assert (gspo.algo.policy_loss, gspo.algo.loss_agg) == ("gspo", "seq-mean-token-mean")
    assert (gspo.algo.clip_eps_low, gspo.algo.clip_eps_high) == (3e-4, 4e-4)
    cispo, _ = compose(["algo=cispo"])
    assert (cispo.algo.policy_loss, cispo.algo.clip_eps_low, cispo.algo.loss_agg) == ("cispo", 1.0, "token-mean")


@pytest.mark.parametrize("overrides, key", [
    (["rollout.top_p=0.9"], "rollout.top_p"),
    (["rollout.top_k=50"], "rollout.top_k"),
    (["rollout.temperature=0"], "rollout.temperature"),
])
def test_rl_refuses_a_sampler_its_log_probs_would_not_match(overrides, key):
    """RL log-probs are softmax(logits / T) over the whole vocabulary; top-p/top-k would make the
    sampler's distribution another one, and T = 0 has no distribution at all."""
    for algo in ("grpo", "ppo"):
        with pytest.raises(ConfigError, match=key):
            compose([f"algo={algo}", *overrides])
    compose(["algo=sft", *overrides])  # evaluation-only sampling elsewhere is not RL's business


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
