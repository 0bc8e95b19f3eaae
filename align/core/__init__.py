"""The alignment math as pure tensor functions.

No trainer state, no config objects, no `.item()`: each function takes tensors and plain
numbers and returns tensors (losses with a dict of detached statistics). Importing this package
imports torch and nothing heavier. docs/paper_index.md maps every registered name to its paper.
"""

from align.core.advantages import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    group_index,
    grpo_advantages,
    grpo_kl_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from align.core.kl import KL_KINDS, kl_penalty
from align.core.logprobs import entropy_from_logits, logprobs_from_logits
from align.core.masked import (
    AGG_MODES,
    aggregate_loss,
    loss_normaliser,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from align.core.offpolicy import CORRECTION_LEVELS, ROLLOUT_CORRECTIONS, rollout_correction
from align.core.ppo import (
    POLICY_LOSSES,
    cispo_policy_loss,
    gae_advantages,
    gspo_policy_loss,
    ppo_policy_loss,
    ppo_value_loss,
    token_rewards,
)
from align.core.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    bradley_terry_loss,
    dpo_sigmoid_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    robust_dpo_loss,
    sequence_logps,
    simpo_loss,
)
from align.core.registry import Registry, UnknownNameError

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "CORRECTION_LEVELS",
    "KL_KINDS",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "REFERENCE_FREE_LOSSES",
    "ROLLOUT_CORRECTIONS",
    "Registry",
    "UnknownNameError",
    "aggregate_loss",
    "bradley_terry_loss",
    "cispo_policy_loss",
    "dpo_sigmoid_loss",
    "dr_grpo_advantages",
    "entropy_from_logits",
    "gae_advantages",
    "group_index",
    "gspo_policy_loss",
    "grpo_advantages",
    "grpo_kl_loss",
    "hinge_loss",
    "ipo_loss",
    "kl_penalty",
    "kto_loss",
    "kto_reference_point",
    "logprobs_from_logits",
    "loss_normaliser",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "orpo_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "robust_dpo_loss",
    "rollout_correction",
    "sequence_logps",
    "simpo_loss",
    "token_rewards",
]
