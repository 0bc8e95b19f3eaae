"""Rollout correction: importance weights between the sampler and the trainer.

The rollout engine samples y_t from mu (its own log-probs: vLLM's kernels, a bf16 merged copy,
a quantized base, a policy version that lags), while the trainer's surrogate assumes the
samples came from pi_old, its own recomputation of the same weights. Any gap makes the update
off-policy even when it is nominally on-policy. Yao et al. 2025, "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training" (https://fengyao.notion.site/off-policy-rl), correct
it with an importance weight rho = pi_old / mu on each token's policy-gradient term, truncated
at a cap C (TIS: w = min(rho, C)); Liu, Li et al. 2025, "When Speed Kills Stability:
Demystifying RL Collapse from the Training-Inference Mismatch" (https://richardli.xyz/rl-collapse), mask
instead (MIS: w = rho if rho <= C else 0), at the token or the sequence level (rho of a sequence
= prod_t rho_t). veRL's `rollout_is` and OpenRLHF's `vllm_is` are the same idea.

The weights carry no gradient: they multiply each token's loss before aggregation
(`ppo_policy_loss(..., weights=...)`). The mismatch statistics are worth logging whatever the
mode: they measure how far the sampler is from the trainer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from align.core.masked import masked_mean

ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")

# exp() of a log-ratio beyond this overflows nothing and means "huge" for any cap.
_LOG_RATIO_BOUND = 20.0


@torch.no_grad()
def rollout_correction(
    old_logp: Tensor,
    rollout_logp: Tensor,
    mask: Tensor,
    mode: str = "tis",
    level: str = "token",
    cap: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights w (B, T) correcting samples drawn by the rollout engine to the trainer.

    With log rho_t = old_logp_t - rollout_logp_t on each valid token:
      - level `token`: rho = rho_t; level `sequence`: rho = exp(sum_t log rho_t), the same
        for every token of the sequence;
      - mode `none`: w = 1; `tis` (truncated IS, Yao et al. 2025): w = min(rho, cap);
        `mis` (masked IS, Liu et al. 2025): w = rho where rho <= cap, else 0 (that token, or
        the whole sequence, leaves the gradient).
    Padding gets w = 0. With an exact engine rho = 1, so w = 1 in every mode.

    Args:
        old_logp: (B, T) the trainer's log-probs of the sampled tokens (pi_old).
        rollout_logp: (B, T) the engine's log-probs of the same tokens (mu), at the same
            temperature.
        mask: (B, T) response mask.
        mode: one of ROLLOUT_CORRECTIONS.
        level: one of CORRECTION_LEVELS.
        cap: C > 0, the truncation (tis) or rejection (mis) threshold.

    Returns:
        weights: (B, T), no gradient.
        stats: abs_logp_diff (mean |log pi_old - log mu| over tokens), kl (k3 estimate of
            KL(mu || pi_old) over tokens, from mu's samples: mean(rho_t - 1 - log rho_t)),
            ratio_max (the largest rho at `level`), weight_mean (mean w over tokens) and
            corrected_frac (tokens whose weight was truncated or masked).
    """
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; valid: {', '.join(ROLLOUT_CORRECTIONS)}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown rollout correction level {level!r}; valid: {', '.join(CORRECTION_LEVELS)}")
    if not cap > 0:
        raise ValueError(f"rollout correction cap must be > 0, got {cap}")
    mask = mask.bool()
    log_ratio = torch.where(mask, old_logp.float() - rollout_logp.float(), torch.zeros_like(old_logp, dtype=torch.float))
    if level == "sequence":
        log_rho = log_ratio.sum(-1, keepdim=True).expand_as(log_ratio)  # (B, T): the sequence's, at every token
    else:
        log_rho = log_ratio
    rho = torch.exp(log_rho.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))  # (B, T)
    if mode == "none":
        weights = torch.ones_like(rho)
    elif mode == "tis":
        weights = rho.clamp(max=cap)
    else:
        weights = torch.where(rho <= cap, rho, torch.zeros_like(rho))
    weights = torch.where(mask, weights, torch.zeros_like(weights))
    corrected = (rho > cap) & mask if mode != "none" else torch.zeros_like(mask)
    token_rho = torch.exp(log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND))
    stats = {
        "abs_logp_diff": masked_mean(log_ratio.abs(), mask),
        "kl": masked_mean(token_rho - 1 - log_ratio, mask),
        "ratio_max": torch.where(mask, rho, torch.zeros_like(rho)).amax() if mask.any() else rho.new_zeros(()),
        "weight_mean": masked_mean(weights, mask),
        "corrected_frac": masked_mean(corrected.float(), mask),
    }
    return weights, stats
