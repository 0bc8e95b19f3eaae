"""Critic-free advantages from sequence rewards, and GRPO's KL-in-loss term.

Every estimator in `ADVANTAGE_ESTIMATORS` has the signature

    fn(rewards (N,), group, **options) -> (advantages (N,), stats)

where `group` says which samples answer the same prompt: either an int G (the N samples are
N / G consecutive blocks of G, the usual layout of `n` samples per prompt) or an (N,) integer
tensor of group ids (any values, any order). The trainer broadcasts a sequence advantage over
its tokens: `advantages[:, None] * mask` (B, T).

Guarantee shared by all estimators: a group whose rewards are all equal (including a group of
one) gets exactly 0, never NaN and never rounding noise blown up by 1/(std + eps).
Statistics are detached 0-dim tensors; `zero_std_group_frac` is the fraction of groups that
carry no signal (what DAPO's dynamic sampling filters out).
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.core.kl import kl_penalty
from align.core.masked import aggregate_loss, masked_whiten
from align.core.registry import Registry

ADVANTAGE_ESTIMATORS = Registry("advantage estimator")


def group_index(group: int | Tensor, n: int, device=None) -> tuple[Tensor, int]:
    """Dense group index (N,) in [0, K) and the number of groups K.

    Args:
        group: int G (consecutive blocks of G) or (N,) integer group ids.
        n: number of samples N.
    """
    if isinstance(group, int):
        if group < 1 or n % group != 0:
            raise ValueError(f"group size {group} does not divide the {n} samples into whole groups")
        return torch.arange(n, device=device) // group, n // group
    if group.shape != (n,):
        raise ValueError(f"group ids must have shape ({n},), got {tuple(group.shape)}")
    ids, index = torch.unique(group, return_inverse=True)
    return index.to(device), ids.numel()


def _as_float(rewards: Tensor) -> Tensor:
    return rewards if rewards.is_floating_point() else rewards.float()  # 0/1 rule rewards may be ints


def _group_stats(rewards: Tensor, group: int | Tensor):
    """Per-sample group size, centred reward, unbiased group std, and whether the group is constant."""
    index, k = group_index(group, rewards.shape[0], rewards.device)
    zeros = rewards.new_zeros(k)
    count = zeros.index_add(0, index, torch.ones_like(rewards))  # (K,)
    mean = zeros.index_add(0, index, rewards) / count
    centred = rewards - mean[index]  # (N,)
    var = zeros.index_add(0, index, centred.square()) / (count - 1).clamp_min(1)
    group_max = zeros.scatter_reduce(0, index, rewards, "amax", include_self=False)
    group_min = zeros.scatter_reduce(0, index, rewards, "amin", include_self=False)
    constant = group_max == group_min  # (K,), True for groups of one too
    return count[index], centred, var.sqrt()[index], constant[index], constant


def _stats(rewards: Tensor, advantages: Tensor, constant_groups: Tensor | None) -> dict[str, Tensor]:
    stats = {
        "reward_mean": rewards.mean(),
        "reward_std": rewards.std(correction=0),
        "advantage_mean": advantages.mean(),
        "advantage_std": advantages.std(correction=0),
    }
    if constant_groups is not None:
        stats["zero_std_group_frac"] = constant_groups.float().mean()
    return {k: v.detach() for k, v in stats.items()}


@ADVANTAGE_ESTIMATORS.register("grpo")
@torch.no_grad()
def grpo_advantages(
    rewards: Tensor, group: int | Tensor, scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO outcome advantage: A_i = (r_i - mean(r_group)) / (std(r_group) + eps).

    DeepSeekMath (https://arxiv.org/abs/2402.03300), Sec. 4.1.2, "Outcome Supervision RL with
    GRPO". The std is the unbiased (Bessel) sample std, as in the public implementations.
    `scale_by_std=False` drops the division (Dr. GRPO's advantage; see `dr_grpo_advantages`).

    Args:
        rewards: (N,) sequence rewards.
        group: int group size G or (N,) group ids.
        scale_by_std: divide by the group std.
        eps: added to the std.

    Returns:
        advantages: (N,). stats: reward_mean, reward_std, advantage_mean, advantage_std,
            zero_std_group_frac.
    """
    rewards = _as_float(rewards)
    _, centred, std, constant, constant_groups = _group_stats(rewards, group)
    advantages = centred / (std + eps) if scale_by_std else centred
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    return advantages, _stats(rewards, advantages, constant_groups)


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
@torch.no_grad()
def dr_grpo_advantages(rewards: Tensor, group: int | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO advantage: A_i = r_i - mean(r_group), no std normalisation.

    Liu et al. 2025, "Understanding R1-Zero-Like Training" (https://arxiv.org/abs/2503.20783),
    Fig. 1. Pair it with `aggregate_loss(mode="seq-mean-token-sum-norm")`, the other
    half of the fix (a constant instead of 1/|o_i|).

    Args:
        rewards: (N,) sequence rewards.
        group: int group size G or (N,) group ids.
    """
    return grpo_advantages(rewards, group, scale_by_std=False)


@ADVANTAGE_ESTIMATORS.register("rloo")
@torch.no_grad()
def rloo_advantages(rewards: Tensor, group: int | Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean(r_group)).

    Kool et al. 2019 (https://openreview.net/forum?id=r1lgTGL5DE) and Ahmadian et al. 2024,
    "Back to Basics" (https://arxiv.org/abs/2402.14740), the RLOO estimator. A group of one has no
    baseline and gets 0.

    Args:
        rewards: (N,) sequence rewards.
        group: int group size G or (N,) group ids.
    """
    rewards = _as_float(rewards)
    size, centred, _, constant, constant_groups = _group_stats(rewards, group)
    advantages = centred * size / (size - 1).clamp_min(1)
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    return advantages, _stats(rewards, advantages, constant_groups)


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
@torch.no_grad()
def reinforce_pp_advantages(
    rewards: Tensor, group: int | Tensor | None = None, subtract_group_mean: bool = False, eps: float = 1e-8
) -> tuple[Tensor, dict[str, Tensor]]:
    """REINFORCE++: whiten the rewards over the whole (global) batch, A = (r - mean) / std.

    Hu 2025, "REINFORCE++" (https://arxiv.org/abs/2501.03262), global batch advantage
    normalisation. `subtract_group_mean=True` first subtracts each group's mean (the paper's
    "REINFORCE++-baseline" variant). This is the outcome-reward form; the token-level form of
    the paper is `gae_advantages(token_rewards(...), values=0, gamma, lam=1)` followed by
    `masked_whiten(advantages, mask)`. Across data-parallel ranks whiten after gathering the
    rewards (the batch statistics are global by definition).

    Args:
        rewards: (N,) sequence rewards.
        group: int group size G or (N,) group ids; used only with subtract_group_mean.
        subtract_group_mean: subtract the group mean before whitening.
        eps: added to the variance inside the square root.
    """
    rewards = _as_float(rewards)
    constant_groups = None
    x = rewards
    if subtract_group_mean:
        if group is None:
            raise ValueError("subtract_group_mean needs the group ids or group size")
        _, centred, _, constant, constant_groups = _group_stats(rewards, group)
        x = torch.where(constant, torch.zeros_like(centred), centred)
    advantages = masked_whiten(x, torch.ones_like(x, dtype=torch.bool), eps=eps)
    return advantages, _stats(rewards, advantages, constant_groups)


def grpo_kl_loss(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kind: str = "k3",
    clamp: float | None = None,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's KL-in-loss term: the aggregated per-token k3 estimate of KL(pi || pi_ref).

    DeepSeekMath (https://arxiv.org/abs/2402.03300), Eq. 3 (the beta * D_KL term of the
    objective) with the estimator of Eq. 4: pi_ref/pi - log(pi_ref/pi) - 1. Unlike PPO's reward
    shaping (`token_rewards`), the gradient flows through `logp`. The caller adds
    `kl_coef * loss` to the policy loss, aggregated with the same `agg` and normaliser.
    Equivalent to `aggregate_loss(kl_penalty(logp, ref_logp, kind, clamp), mask, agg, normaliser)`.

    Args:
        logp: (B, T) policy log-probs (with grad).
        ref_logp: (B, T) reference log-probs.
        mask: (B, T) response mask.
        kind, clamp: see `kl_penalty`.
        agg, normaliser: see `aggregate_loss`.

    Returns:
        loss: scalar. stats: kl (the same value, detached).
    """
    mask = mask.bool()
    # padding zeroed before kl_penalty so junk there cannot reach logp's gradient as 0 * NaN
    logp = torch.where(mask, logp, torch.zeros_like(logp))
    ref_logp = torch.where(mask, ref_logp, torch.zeros_like(ref_logp))
    loss = aggregate_loss(kl_penalty(logp, ref_logp, kind, clamp), mask, agg, normaliser)
    return loss, {"kl": loss.detach()}
