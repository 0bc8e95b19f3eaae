"""Per-token estimators of KL(pi || pi_ref) from log-probabilities of sampled tokens.

With r = log pi(y_t) - log pi_ref(y_t) for a token y_t sampled from pi (J. Schulman,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html):

| kind | estimator           | bias               | sign       |
| k1   | r                   | unbiased           | either     |
| abs  | |r|                 | biased             | >= 0       |
| k2   | r^2 / 2             | biased, low var.   | >= 0       |
| k3   | exp(-r) - 1 + r     | unbiased, low var. | >= 0       |

k3 is the estimator of GRPO's KL-in-loss term (DeepSeekMath, arXiv:2402.03300, Eq. 4).
"""

from __future__ import annotations

import torch
from torch import Tensor

# exp(-r) for r below this overflows nothing in fp32/bf16 (e^20 ~ 4.9e8) yet is already far
# beyond any penalty that means something; k3 caps r here so its value and gradient stay finite.
_K3_LOG_RATIO_BOUND = 20.0

KL_KINDS = ("k1", "abs", "k2", "k3")


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1", clamp: float | None = None) -> Tensor:
    """Per-token KL estimate between the policy and the reference on sampled tokens.

    See the module docstring for the estimators. For k3 the log-ratio is clamped to
    [-20, 20] before the exponential (a numerical guard: k3(-20) is already ~4.9e8), so extreme
    log-ratios give finite values and gradients. Masking is the caller's: combine with
    `aggregate_loss` or `masked_mean`.

    Args:
        logp: (B, T) log pi(y_t) of the policy.
        ref_logp: (B, T) log pi_ref(y_t) of the reference, same tokens.
        kind: one of KL_KINDS.
        clamp: when set, the estimate is clamped to [-clamp, clamp] (PPO trainers cap the
            per-token penalty this way so one degenerate token cannot dominate the reward).

    Returns:
        (B, T) per-token estimate.
    """
    log_ratio = logp - ref_logp
    if kind == "k1":
        kl = log_ratio
    elif kind == "abs":
        kl = log_ratio.abs()
    elif kind == "k2":
        kl = 0.5 * log_ratio.square()
    elif kind == "k3":
        r = log_ratio.clamp(-_K3_LOG_RATIO_BOUND, _K3_LOG_RATIO_BOUND)
        kl = torch.expm1(-r) + r  # exp(-r) - 1 + r
    else:
        raise ValueError(f"unknown KL estimator {kind!r}; valid kinds: {', '.join(KL_KINDS)}")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl
