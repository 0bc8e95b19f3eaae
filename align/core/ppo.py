"""PPO on token sequences: KL-shaped token rewards, GAE, the clipped policy and value losses.

All token tensors are (B, T) over *response* positions, right-padded, with `mask` True on real
response tokens. Statistics are detached 0-dim tensors, ready to log.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.core.kl import kl_penalty
from align.core.masked import aggregate_loss, masked_mean, masked_var
from align.core.registry import Registry

POLICY_LOSSES = Registry("policy loss")

# exp() of a log-ratio beyond this is meaningless for PPO and would overflow fp32 at ~88.
_LOG_RATIO_BOUND = 20.0


def _last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last set position of each row (0 for an empty row)."""
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # (T,), 1-based
    return (mask.bool() * positions).argmax(-1)


@torch.no_grad()
def token_rewards(
    scores: Tensor,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: str = "k1",
    kl_clamp: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token RLHF reward: -kl_coef * KL at every token, plus the sequence score at the last.

    r_t = -beta * KL_t + [t == last] * score: the KL-penalised reward of InstructGPT
    (https://arxiv.org/abs/2203.02155, Eq. 2; first in Ziegler et al. 2019,
    https://arxiv.org/abs/1909.08593), with the KL term spread over tokens as PPO-for-LLM
    implementations do. A row with no valid token gets zeros (its score is dropped: there is
    no token to credit). No gradient flows: rewards are targets.

    Args:
        scores: (B,) sequence-level scores (reward model or rule rewards).
        logp: (B, T) policy log-probs of the response tokens.
        ref_logp: (B, T) reference log-probs of the same tokens.
        mask: (B, T) response mask, right-padded.
        kl_coef: beta >= 0.
        kl_kind, kl_clamp: see `kl_penalty`.

    Returns:
        rewards: (B, T), zero on padding.
        stats: kl (per-sequence summed KL, batch mean), score (mean), non_score_reward
            (per-sequence sum of -beta * KL, batch mean).
    """
    mask = mask.bool()
    kl = torch.where(mask, kl_penalty(logp, ref_logp, kl_kind, kl_clamp), torch.zeros_like(logp))  # (B, T)
    rewards = -kl_coef * kl
    has_tokens = mask.any(-1)  # (B,)
    credited = torch.where(has_tokens, scores.to(rewards.dtype), torch.zeros_like(rewards[:, 0]))
    rewards = rewards.scatter_add(1, _last_token_index(mask)[:, None], credited[:, None])
    with torch.no_grad():
        kl_per_seq = kl.sum(-1)
        stats = {
            "kl": kl_per_seq.mean().detach(),
            "score": scores.float().mean().detach(),
            "non_score_reward": (-kl_coef * kl_per_seq).mean().detach(),
        }
    return rewards, stats


@torch.no_grad()
def gae_advantages(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over right-padded responses.

    delta_t = r_t + gamma * V_{t+1} - V_t and A_t = sum_l (gamma * lam)^l delta_{t+l}
    (Schulman et al. 2015, https://arxiv.org/abs/1506.02438, Eq. 16), computed by the reverse
    recursion A_t = delta_t + gamma * lam * A_{t+1}, vectorised over the batch. Values and
    advantages beyond the last valid token count as 0 (the episode ends there). Returns are
    A_t + V_t, the lambda-return targets of the value loss. With values = 0 and lam = 1 the
    advantages are the discounted returns-to-go (REINFORCE, and REINFORCE++ before whitening).
    No gradient flows: these are targets. Whitening is separate (`masked_whiten`).

    Masked positions inside a row (a multi-turn episode's environment tokens, rollout/multiturn.py)
    are skipped, not ended at: the recursion runs over the model's own tokens in order, t + 1 being
    the next model token (as veRL's GAE does with its response mask). Right padding alone gives the
    textbook recursion.

    Args:
        rewards: (B, T) per-token rewards (see `token_rewards`).
        values: (B, T) critic values V(s_t).
        mask: (B, T) response mask (the model's tokens), right-padded.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        advantages: (B, T), zero where the mask is.
        returns: (B, T), zero where the mask is.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(mask, rewards.to(values.dtype), zero)
    values = torch.where(mask, values, zero)
    B, T = values.shape
    advantages = torch.zeros_like(values)
    running = values.new_zeros(B)  # A of the next model token
    next_value = values.new_zeros(B)  # V of the next model token, 0 past the end
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(mask[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(mask[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(mask[:, t], running, zero)
    returns = torch.where(mask, advantages + values, zero)
    return advantages, returns


@POLICY_LOSSES.register("ppo")
def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate, with asymmetric clip-higher and dual-clip.

    Per token, with ratio rho = exp(logp - old_logp) and advantage A:
        l = max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))
    (the negated L^CLIP of Schulman et al. 2017, https://arxiv.org/abs/1707.06347, Eq. 7;
    eps_high > eps_low is DAPO's clip-higher, https://arxiv.org/abs/2503.14476, Sec. 3.1).
    With dual_clip = c > 1 and A < 0 the loss is further capped at -A * c (Ye et al. 2020,
    https://arxiv.org/abs/1912.09729, "dual-clip PPO"), so a huge ratio on a bad action
    cannot produce an unbounded update. The log-ratio is clamped to [-20, 20] before exp so the
    loss stays finite for any inputs.

    Args:
        logp: (B, T) current policy log-probs (with grad).
        old_logp: (B, T) log-probs of the policy that sampled the tokens.
        advantages: (B, T) per-token advantages (a sequence advantage broadcast over its tokens).
        mask: (B, T) response mask.
        clip_eps_low: lower clip epsilon.
        clip_eps_high: upper clip epsilon; None means clip_eps_low (symmetric PPO).
        dual_clip: c > 1, or None to disable.
        agg, normaliser: see `aggregate_loss`.
        weights: (B, T) per-token weights without gradient, multiplying each token's loss before
            aggregation: the rollout correction's importance weights (`rollout_correction`), or
            None for 1.

    Returns:
        loss: scalar.
        stats: clipfrac (tokens on the clipped branch), clipfrac_low / clipfrac_high (A < 0 below
            1 - eps_low / A > 0 above 1 + eps_high), dual_clipfrac (when enabled), approx_kl
            (k3 estimate of KL(old || new)), ratio_mean, ratio_max.
    """
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    mask = mask.bool()
    # Zero the padding *before* the arithmetic: NaN there would otherwise reach logp's gradient
    # as 0 * NaN even though aggregate_loss drops it from the value.
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))
    log_ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)  # (B, T)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    if dual_clip is not None:
        loss_dual = torch.minimum(loss_mat, -advantages * dual_clip)
        loss_mat = torch.where(advantages < 0, loss_dual, loss_mat)
    loss = aggregate_loss(_weighted(loss_mat, weights, mask), mask, agg, normaliser)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "clipfrac_low": masked_mean(((ratio < 1.0 - clip_eps_low) & (advantages < 0)).float(), mask),
            "clipfrac_high": masked_mean(((ratio > 1.0 + eps_high) & (advantages > 0)).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, torch.zeros_like(ratio)).amax(),
        }
        if dual_clip is not None:
            dual_active = (advantages < 0) & (loss_mat < torch.maximum(loss_unclipped, loss_clipped))
            stats["dual_clipfrac"] = masked_mean(dual_active.float(), mask)
    return loss, {k: v.detach() for k, v in stats.items()}


def _weighted(loss_mat: Tensor, weights: Tensor | None, mask: Tensor) -> Tensor:
    """loss_mat * weights on the selected tokens (weights carry no gradient); loss_mat if None."""
    if weights is None:
        return loss_mat
    return torch.where(mask.bool(), loss_mat * weights.detach().to(loss_mat.dtype), loss_mat)


@POLICY_LOSSES.register("gspo")
def gspo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float = 3e-4,
    clip_eps_high: float | None = 4e-4,
    agg: str = "seq-mean-token-mean",
    normaliser: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GSPO: the clipped surrogate on a sequence-level, length-normalised importance ratio.

    Zheng et al. 2025, "Group Sequence Policy Optimization" (https://arxiv.org/abs/2507.18071):
        s_i = (pi(y_i | x) / pi_old(y_i | x)) ** (1 / |y_i|) = exp(mean_t (logp_t - old_logp_t))   (Eq. 7)
        l_i = max(-A_i * s_i, -A_i * clip(s_i, 1 - eps_low, 1 + eps_high))                          (Eq. 5)
    written per token in the paper's GSPO-token form (Eq. 13-14): s_i,t = sg[s_i] * pi(y_t) /
    sg[pi(y_t)] has the value s_i at every token of sequence i and the gradient s_i * grad log
    pi(y_t). With an advantage constant over each sequence and `agg="seq-mean-token-mean"` the
    loss equals 1/G sum_i l_i and its gradient is GSPO's (Eq. 10, Eq. 17): the whole sequence
    is clipped or kept together. The paper's clip range is 3e-4 / 4e-4 (Sec. 5.1), tiny because
    it bounds a per-token geometric mean.

    Args:
        logp: (B, T) current policy log-probs (with grad).
        old_logp: (B, T) log-probs of the policy that sampled the tokens.
        advantages: (B, T) per-token advantages (a sequence advantage broadcast over its tokens).
        mask: (B, T) response mask.
        clip_eps_low, clip_eps_high: the clip range of s_i (None high: = low).
        agg, normaliser: see `aggregate_loss`; GSPO is `seq-mean-token-mean`.
        weights: (B, T) per-token weights without gradient (see `ppo_policy_loss`).

    Returns:
        loss: scalar.
        stats: clipfrac (tokens of clipped sequences), approx_kl (k3 of the token log-ratios),
            seq_ratio_mean / seq_ratio_max over non-empty sequences.
    """
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    mask = mask.bool()
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp))  # (B, T)
    seq_log_ratio = log_ratio.sum(-1) / mask.sum(-1).clamp_min(1)  # (B,): log s_i
    seq_log_ratio = seq_log_ratio.detach().clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    token_log_ratio = seq_log_ratio[:, None] + (logp - logp.detach())  # value log s_i, gradient of logp_t
    ratio = torch.exp(torch.where(mask, token_log_ratio, torch.zeros_like(token_log_ratio)))  # (B, T)
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high)
    loss_mat = torch.maximum(loss_unclipped, loss_clipped)
    loss = aggregate_loss(_weighted(loss_mat, weights, mask), mask, agg, normaliser)

    with torch.no_grad():
        seqs = mask.any(-1)  # (B,)
        seq_ratio = torch.exp(seq_log_ratio)
        stats = {
            "clipfrac": masked_mean((loss_clipped > loss_unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "seq_ratio_mean": masked_mean(seq_ratio, seqs),
            "seq_ratio_max": torch.where(seqs, seq_ratio, torch.zeros_like(seq_ratio)).amax(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


@POLICY_LOSSES.register("cispo")
def cispo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float = 1.0,
    clip_eps_high: float | None = 0.28,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """CISPO: REINFORCE with a clipped, stop-gradient importance weight on every token.

    MiniMax-M1 (https://arxiv.org/abs/2506.13585), Eq. 4-5:
        l_t = -sg(clip(r_t, 1 - eps_low, 1 + eps_high)) * A_t * logp_t,   r_t = exp(logp_t - old_logp_t)
    Unlike PPO's clip, no token's gradient is dropped: a token far outside the trust region
    still gets grad log pi, only with a bounded weight. The paper bounds the weight above only
    (`clip_eps_low = 1`: a lower bound of 0) and aggregates over all tokens of the batch
    (`token-mean`). The loss value is the surrogate's, not a ratio: read its gradient.

    Args:
        logp: (B, T) current policy log-probs (with grad).
        old_logp: (B, T) log-probs of the policy that sampled the tokens.
        advantages: (B, T) per-token advantages.
        mask: (B, T) response mask.
        clip_eps_low, clip_eps_high: the weight's clip range [1 - eps_low, 1 + eps_high]
            (eps_low <= 1; None high: = low).
        agg, normaliser: see `aggregate_loss`.
        weights: (B, T) per-token weights without gradient (see `ppo_policy_loss`).

    Returns:
        loss: scalar.
        stats: clipfrac (tokens whose weight was clipped), approx_kl, ratio_mean, ratio_max.
    """
    eps_high = clip_eps_low if clip_eps_high is None else clip_eps_high
    if not 0 < clip_eps_low <= 1:
        raise ValueError(f"cispo: clip_eps_low must be in (0, 1] (the weight stays >= 0), got {clip_eps_low}")
    mask = mask.bool()
    advantages = torch.where(mask, advantages, torch.zeros_like(advantages))
    logp_selected = torch.where(mask, logp, torch.zeros_like(logp))
    log_ratio = torch.where(mask, logp - old_logp, torch.zeros_like(logp)).detach()
    ratio = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))  # (B, T), no gradient
    is_weight = ratio.clamp(1.0 - clip_eps_low, 1.0 + eps_high)
    loss_mat = -is_weight * advantages * logp_selected
    loss = aggregate_loss(_weighted(loss_mat, weights, mask), mask, agg, normaliser)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((is_weight != ratio).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": torch.where(mask, ratio, torch.zeros_like(ratio)).amax(),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    agg: str = "token-mean",
    normaliser: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = V_old + clip(V - V_old, +-eps).

    Value clipping is not in the PPO paper; it comes from OpenAI's baselines PPO2 and is
    analysed in Engstrom et al. 2020 (https://arxiv.org/abs/2005.12729, "value function clipping"). `clip_eps=None` gives the plain 0.5 * (V - R)^2.

    Args:
        values: (B, T) current critic values (with grad).
        old_values: (B, T) critic values at rollout time.
        returns: (B, T) targets (GAE returns).
        mask: (B, T) response mask.
        clip_eps: clip range around old_values, or None.
        agg, normaliser: see `aggregate_loss`.

    Returns:
        loss: scalar.
        stats: vf_clipfrac (tokens where the clipped error is the larger one), value_mean,
            explained_variance (1 - Var[R - V] / Var[R]; 0 when Var[R] = 0).
    """
    mask = mask.bool()
    returns = torch.where(mask, returns, torch.zeros_like(returns))  # NaN-safe gradient, as above
    old_values = torch.where(mask, old_values, torch.zeros_like(old_values))
    err_unclipped = (values - returns).square()
    if clip_eps is None:
        err = err_unclipped
        clipped_active = torch.zeros_like(values, dtype=torch.bool)
    else:
        values_clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err_clipped = (values_clipped - returns).square()
        err = torch.maximum(err_unclipped, err_clipped)
        clipped_active = err_clipped > err_unclipped
    loss = aggregate_loss(0.5 * err, mask, agg, normaliser)

    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        var_residual = masked_var(returns - values, mask)
        explained = torch.where(var_returns > 0, 1 - var_residual / var_returns, torch.zeros_like(var_returns))
        stats = {
            "vf_clipfrac": masked_mean(clipped_active.float(), mask),
            "value_mean": masked_mean(values, mask),
            "explained_variance": explained,
        }
    return loss, {k: v.detach() for k, v in stats.items()}

