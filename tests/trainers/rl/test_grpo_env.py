"""GRPO and PPO on a multi-turn environment end to end on CPU (the Ray driver, env=guess_number)."""

from __future__ import annotations

import math

import pytest

from align.config import compose
from align.trainers.metrics import read_metrics

GAME = [
    "algo=grpo", "data=story_prompts", "env=guess_number", "env.options.high=2", "env.max_turns=2",
    "env.max_total_tokens=96", "rollout.max_new_tokens=6", "trainer.progress=false", "trainer.num_threads=1",
    "algo.rollout_batch_size=4", "algo.num_generations=8", "algo.eval_prompts=32", "algo.eval_samples=2", "seed=0",
]


@pytest.mark.slow
def test_grpo_raises_heldout_success_on_guess_the_number(ray_cluster, tmp_path):
    """10 GRPO steps (4 story prompts x 8 episodes, LoRA on stories260K, fixed seed) on guess-the-
    number in [1, 2] with two turns ("higher"/"lower" after a miss) lift the held-out success rate
    (32 unseen prompts x 2 episodes, same seed before and after) by more than 0.25.
    Measured: 0.03 -> 0.47 (training batches 0.0 -> 0.75; turns 2.0 -> 1.25), ~55 s on 2 shared cores.
    What it learns first is to answer with a number word at once; answering "two" after "higher"
    is not learned within 30 steps (scripts/bench_agent.py: 0.47 at steps 10, 20 and 30)."""
    from align.trainers.grpo import train

    cfg, hydra_cfg = compose([*GAME, f"output_dir={tmp_path}", "trainer.max_steps=10", "trainer.eval_every=10",
                              "trainer.save_every=10"])
    summary = train(cfg, hydra_cfg)
    rows = read_metrics(tmp_path)
    before, after = rows[0]["eval/success"], rows[-1]["eval/success"]
    assert after > before + 0.25, (before, after)
    assert summary["eval_reward_after"] == after  # the reward is 1 per solved episode, 0 otherwise
    for r in rows[1:]:
        assert math.isfinite(r["actor/loss"]) and r["samples"] == 32 and 1.0 <= r["env/turns"] <= 2.0
        # the trainer scores the model's tokens of whole episodes as the engine sampled them
        assert r["actor/mismatch/abs_logp_diff"] < 1e-4
    # the response side holds the environment's tokens too: more than 2 turns x 6 model tokens
    assert rows[1]["response_length"] > 2 * 6


def test_env_config_is_refused_for_other_stages_and_unknown_names():
    from align.config import ConfigError

    with pytest.raises(ConfigError, match="for the RL stages"):
        compose(["algo=dpo", "env=guess_number"])
    with pytest.raises(ConfigError, match="env.name: unknown environment 'maze'"):
        compose(["algo=grpo", "env=guess_number", "env.name=maze"])
    cfg, _ = compose(["algo=grpo", "env=calculator", "data=gsm8k"])
    assert cfg.env.name == "calculator" and cfg.env.options["parser"] == "hermes"
    assert compose(["algo=grpo"])[0].env.name is None  # single-turn by default


@pytest.mark.slow
def test_ppo_runs_multiturn_episodes(ray_cluster, tmp_path):
    """Two PPO iterations on guess_number: the critic reads the environment's tokens, the losses
    (GAE skipping them) are finite, and the episodes are multi-turn."""
    from align.trainers.ppo import train

    cfg, hydra_cfg = compose([*[o for o in GAME if o != "algo=grpo"], "algo=ppo", f"output_dir={tmp_path}",
                              "trainer.max_steps=2", "trainer.eval_every=2", "trainer.save_every=2",
                              "algo.rollout_batch_size=2", "algo.num_generations=4", "algo.minibatch_size=4",
                              "algo.eval_prompts=4"])
    train(cfg, hydra_cfg)
    rows = read_metrics(tmp_path)[1:]
    assert len(rows) == 2
    for r in rows:
        assert math.isfinite(r["actor/loss"]) and math.isfinite(r["critic/vf_loss"]) and r["env/turns"] > 1.0
