"""PPO with a critic, for language models: KL-shaped token rewards, GAE, clipped losses.

    python -m align algo=ppo                     # stories260K + the story reward, on CPU

The RLHF recipe of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593) and InstructGPT
(https://arxiv.org/abs/2203.02155, Eq. 2): each response earns its sequence score at its last
token and -kl_coef * KL(pi_old || pi_ref) at every token; GAE (Schulman et al. 2015) turns these
into advantages and value targets with the critic's values; then `ppo_epochs` passes over
minibatches optimise the clipped surrogate (Schulman et al. 2017, Eq. 7) and the clipped value
loss. The actor, critic and reference share one base model (LoRA adapters; the reference is the
base with adapters off), so step 4 is one fused no-grad pass over the batch.

kl_coef is fixed, or adaptive (Ziegler et al. 2019, Sec. 2.2): it grows when the measured KL is
above `kl_target` and shrinks below it. Old log-probs are recomputed only when the policy takes
more than one optimizer step per iteration (see `RLRun.recompute_old_logp`); otherwise the
rollout engine's log-probs serve for the KL shaping. Log-probs are at the rollout temperature,
and the engine/trainer gap is logged and corrected by importance weights, as in GRPO
(`algo.rollout_correction`).
"""

from __future__ import annotations

from dataclasses import dataclass

from align.config import RunConfig
from align.core import gae_advantages, masked_whiten, token_rewards
from align.trainers.rl import RLRun
from align.workers.worker import ActorLoss, CriticLoss


@dataclass
class KLController:
    """kl_coef of the reward shaping: fixed, or adaptive (Ziegler et al. 2019, Sec. 2.2):
    e = clip(KL / target - 1, -0.2, 0.2); coef <- coef * (1 + e * samples / horizon)."""

    value: float
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def update(self, kl: float, samples: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * samples / self.horizon


def train(cfg: RunConfig, hydra_cfg=None) -> dict:
    """Run PPO as configured; returns the summary (also written to summary.json)."""
    algo = cfg.algo
    run = RLRun(cfg, hydra_cfg, roles=("actor", "critic"), headline=("reward/mean", "eval/reward", "time/step"))
    kl_ctl = KLController(run.state.get("kl_coef", algo.kl_coef), algo.kl_controller == "adaptive",
                          algo.kl_target, algo.kl_horizon)
    actor_loss = ActorLoss.from_config(algo, cfg.trainer.batch_size, kl_in_loss=False)
    critic_loss = CriticLoss(value_clip=algo.value_clip, agg=algo.loss_agg, vf_coef=algo.vf_coef,
                             micro_batch_size=cfg.trainer.batch_size)
    with run.guard():
        run.initial_eval()
        for step in run.steps():
            # 1. Sample a batch of prompts.
            items = run.next_prompts()
            # 2. Generate responses with the actor.
            with run.phase("generate"):
                batch = run.generate(items, algo.num_generations, seed=cfg.seed * 100_003 + step)
            # 3. Sequence scores: rule rewards and/or the reward model.
            with run.phase("reward"):
                batch, metrics = run.rule_and_model_scores(batch, items)
            # 4. Reference log-probs, critic values (and old log-probs when off-policy): one fused pass.
            recompute = run.recompute_old_logp(len(batch))
            with run.phase("reference"):
                batch = run.placement.annotate(batch, ("reference", "critic") + (("actor",) if recompute else ()))
            # 5. KL-shaped token rewards, GAE advantages and returns, whitened advantages.
            policy_logp = batch.old_logp if recompute else batch.rollout_logp
            rewards, kl_stats = token_rewards(batch.scores, policy_logp, batch.ref_logp, batch.response_mask,
                                              kl_ctl.value, algo.kl_kind)
            advantages, returns = gae_advantages(rewards, batch.values, batch.response_mask, algo.gamma, algo.lam)
            if algo.whiten_advantages:
                advantages = masked_whiten(advantages, batch.response_mask)
            batch = batch.replace(token_rewards=rewards, advantages=advantages, returns=returns)
            # 6. Actor and critic updates: ppo_epochs x minibatches each (concurrent when split).
            with run.phase("update"):
                stats = run.update_roles(step, batch, {"actor": actor_loss, "critic": critic_loss})
            # 7. Weight sync to the rollout engine.
            with run.phase("sync"):
                run.sync()
            # 8. KL controller, metrics, evaluation and checkpoint.
            metrics.update(stats)
            metrics.update({f"kl/{k}": float(v) for k, v in kl_stats.items()})
            metrics["kl/coef"] = kl_ctl.value
            metrics.update(run.batch_metrics(batch))
            kl_ctl.update(float(kl_stats["kl"]), len(batch))
            run.end_step(step, metrics, trainer_state={"kl_coef": kl_ctl.value})
        return run.summary(export_dir=run.export())
