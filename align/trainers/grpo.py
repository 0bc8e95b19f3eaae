"""GRPO: group-relative policy optimisation, with Dr. GRPO, RLOO and DAPO's options by config.

    python -m align algo=grpo                    # stories260K + the story reward, on CPU

Shao et al. 2024, DeepSeekMath (https://arxiv.org/abs/2402.03300), Sec. 4: sample G responses
per prompt, score them, use each response's reward relative to its group as the advantage of
all its tokens, and optimise the clipped surrogate with a k3 KL penalty to the reference inside
the loss (Eq. 3). No critic. Options: the advantage estimator (`grpo`, `dr_grpo` of Liu et al.
2025, `rloo`, `reinforce_pp`), clip-higher (`clip_eps_high`, DAPO Sec. 3.1), dropping groups
whose rewards are all equal (`filter_zero_variance`, DAPO's dynamic sampling without
re-sampling), rule rewards, a reward model, or both.

Old log-probs: with one optimizer step per iteration (ppo_epochs 1, one minibatch) the update
is on-policy for the trainer, the ratio is 1 and its gradient is that of log pi, so the trainer
uses the live log-probs (detached) and skips recomputing them; otherwise they come from the same
fused no-grad pass as the reference log-probs. Every log-prob is at the rollout temperature. The
behaviour policy is the rollout engine's: the gap between its log-probs and the trainer's is
logged (actor/mismatch/*) and corrected by truncated or masked importance weights
(`algo.rollout_correction`, align/core/offpolicy.py). `algo=dr_grpo`, `algo=gspo` and
`algo=cispo` are presets of this driver (configs/algo/).

Asynchronous RL (`rollout.mode=async`, split placement): a rollout group generates the next
batches while the trainer updates on this one (veRL's one-step-off-policy trainer, simpler);
each sample may lag the trained policy by up to `rollout.max_staleness` versions, which the
rollout correction (pi_old / mu with the engine's log-probs as mu) accounts for, as in
decoupled PPO (AReaL, Fu et al. 2025, arXiv:2505.24298).
"""

from __future__ import annotations

import torch

from align.config import RunConfig
from align.core import ADVANTAGE_ESTIMATORS, group_index
from align.trainers.rl import RLRun
from align.workers.batch import Experience
from align.workers.worker import ActorLoss


def filter_zero_variance_groups(batch: Experience) -> Experience:
    """The rows of the groups whose scores are not all equal, in order. A group that scored every
    sample the same has zero advantage under any group baseline: it adds nothing to the gradient
    and only dilutes the loss normaliser (DAPO, arXiv:2503.14476, Sec. 3.2)."""
    index, k = group_index(batch.group_ids, len(batch))  # (B,) dense group index
    group_max = batch.scores.new_full((k,), -torch.inf).scatter_reduce(0, index, batch.scores, "amax")
    group_min = batch.scores.new_full((k,), torch.inf).scatter_reduce(0, index, batch.scores, "amin")
    keep = (group_max > group_min)[index]  # (B,)
    return batch.select(keep.nonzero().squeeze(-1))


def train(cfg: RunConfig, hydra_cfg=None) -> dict:
    """Run GRPO as configured; returns the summary (also written to summary.json)."""
    algo = cfg.algo
    run = RLRun(cfg, hydra_cfg, roles=("actor",), headline=("reward/mean", "eval/reward", "time/step"))
    estimator = ADVANTAGE_ESTIMATORS.get(algo.advantage_estimator)
    loss = ActorLoss.from_config(algo, cfg.trainer.batch_size, kl_in_loss=True)
    with run.guard():
        run.initial_eval()
        for step in run.steps():
            # 1-2. A batch of prompts and G responses to each: generated now by the actor replicas
            # (rollout.mode=sync), or taken from the rollout group's queue (async: generated at most
            # rollout.max_staleness policy versions ago while the previous updates ran).
            with run.phase("generate"):
                items, batch, rollout_metrics = run.rollout(step, algo.num_generations)
            # 3. Score them: rule rewards on the driver, and/or the reward model's score head.
            with run.phase("reward"):
                batch, metrics = run.rule_and_model_scores(batch, items)
            metrics.update(rollout_metrics)
            # 4. Group-relative advantages, broadcast over each response's tokens.
            advantages, adv_stats = estimator(batch.scores, batch.group_ids)
            batch = batch.replace(advantages=advantages[:, None] * batch.response_mask)  # (B, R)
            if algo.filter_zero_variance:
                batch = filter_zero_variance_groups(batch)
                metrics["filtered_frac"] = 1.0 - len(batch) / (len(items) * algo.num_generations)
            # 5. Reference log-probs (and old log-probs when the update is off-policy): one fused pass.
            # (async with rollout.producer_reference: the rollout worker has added the reference's.)
            reference = algo.kl_coef > 0 and batch.ref_logp is None
            roles = (("reference",) if reference else ()) + (("actor",) if run.recompute_old_logp(len(batch)) else ())
            with run.phase("reference"):
                if roles and len(batch):
                    batch = run.placement.annotate(batch, roles)
            # 6. Policy update: ppo_epochs x minibatches, sharded over the replicas.
            with run.phase("update"):
                stats = run.update_roles(step, batch, {"actor": loss}) if len(batch) else {}
            # 7. Weight sync to the rollout engine (async: published as the next policy version).
            with run.phase("sync"):
                run.sync()
            # 8. Metrics, evaluation and checkpoint.
            metrics.update(stats)
            metrics.update({f"adv/{k}": float(v) for k, v in adv_stats.items()})
            metrics.update(run.batch_metrics(batch))
            run.end_step(step, metrics, trainer_state={})
        return run.summary(export_dir=run.export())
