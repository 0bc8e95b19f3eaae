"""Masked reductions, whitening and loss aggregation over right-padded token tensors.

Conventions shared by all of `align.core`:
- token tensors are (B, T): B sequences (responses), T padded positions;
- `mask` is bool or 0/1 of the same shape (or broadcastable to it), True on real tokens;
- masked-out positions are *selected away* (`torch.where`), never multiplied by zero, so NaN or
  inf left in padding cannot leak into a result (0 * inf = NaN); the per-token losses built on
  these (`ppo_policy_loss`, `ppo_value_loss`, `grpo_kl_loss`) also zero padded inputs before
  their arithmetic, so junk cannot reach a gradient either;
- an empty selection gives 0, never NaN.

Loss aggregation (`aggregate_loss`) is written as numerator / normaliser, where the numerator
is a plain sum over tokens or sequences. Shard numerators therefore add up to the whole-batch
numerator, and passing the *global* normaliser (all-reduced sum of `loss_normaliser` over
data-parallel ranks) makes the per-shard losses add up to the whole-batch loss exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _select(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, exact zeros elsewhere (NaN/inf in padding are dropped, not multiplied)."""
    return torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _count(x: Tensor, mask: Tensor, dim=None) -> Tensor:
    """Number of selected elements of x, in x's dtype."""
    m = torch.broadcast_to(mask.bool(), x.shape).to(x.dtype)
    return m.sum() if dim is None else m.sum(dim)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x over positions where mask is set; over everything when dim is None.

    Args:
        x: (B, T) or any shape.
        mask: bool or 0/1, broadcastable to x.
        dim: dimension to reduce; None reduces all.
    """
    selected = _select(x, mask)
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over positions where mask is set; 0 (not NaN) where nothing is selected.

    Args:
        x: (B, T) or any shape.
        mask: bool or 0/1, broadcastable to x.
        dim: dimension to reduce; None reduces all.
    """
    return masked_sum(x, mask, dim) / _count(x, mask, dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of the selected elements of x (all of them together), a scalar.

    With `unbiased` the sum of squares is divided by n - 1 (Bessel). With fewer than two selected
    elements the variance is 0, not NaN.

    Args:
        x: (B, T) or any shape.
        mask: bool or 0/1, broadcastable to x.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _count(x, mask)
        var = var * n / (n - 1).clamp_min(1)  # n <= 1: the variance is already exactly 0
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the selected elements; masked positions come back as 0.

    `shift_mean=False` rescales but adds the mean back (as PPO implementations do for rewards).
    When every selected value is equal the centred values are exactly 0: without this, rounding in
    the mean (about 1 ulp) would be amplified by 1/sqrt(eps) into spurious non-zero outputs.

    Args:
        x: (B, T) or any shape.
        mask: bool or 0/1, broadcastable to x.
    """
    mask = torch.broadcast_to(mask.bool(), x.shape)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    selected_max = torch.where(mask, x, torch.full_like(x, -torch.inf)).amax()
    selected_min = torch.where(mask, x, torch.full_like(x, torch.inf)).amin()
    centred = torch.where(selected_max == selected_min, torch.zeros_like(x), x - mean)
    whitened = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _select(whitened, mask)


def loss_normaliser(mask: Tensor, mode: str = "token-mean", max_len: int | None = None) -> Tensor:
    """The denominator `aggregate_loss` uses by default for this (local) mask.

    For data-parallel training, all-reduce (sum) this over ranks and pass the result as
    `aggregate_loss(..., normaliser=...)`: the per-rank losses then sum to the whole-batch loss
    (average the gradients with SUM, or multiply the loss by world size under DDP's mean).

    | mode                    | normaliser                                          |
    | token-mean              | number of valid tokens                              |
    | seq-mean-token-sum      | number of sequences with at least one valid token  |
    | seq-mean-token-mean     | number of sequences with at least one valid token  |
    | seq-mean-token-sum-norm | that number of sequences * max_len (Dr. GRPO)       |

    Args:
        mask: (B, T) bool or 0/1.
        mode: one of AGG_MODES.
        max_len: Dr. GRPO's constant per-sequence normaliser, e.g. the generation budget
            `max_new_tokens`; defaults to T. Pass it explicitly so that shards (or steps) padded
            to different widths use the same constant.
    """
    _check_mode(mode)
    mask = mask.bool()
    if mode == "token-mean":
        return mask.sum().float()
    num_seqs = mask.any(-1).sum().float()
    if mode == "seq-mean-token-sum-norm":
        return num_seqs * (mask.shape[-1] if max_len is None else max_len)
    return num_seqs


def aggregate_loss(
    loss_mat: Tensor, mask: Tensor, mode: str = "token-mean", normaliser: float | Tensor | None = None
) -> Tensor:
    """Reduce a per-token loss to a scalar: numerator(mode) / normaliser.

    | mode                    | numerator                            | default normaliser |
    | token-mean              | sum of all valid token losses        | valid tokens       |
    | seq-mean-token-sum      | sum of all valid token losses        | non-empty seqs     |
    | seq-mean-token-mean     | sum over seqs of the per-seq mean    | non-empty seqs     |
    | seq-mean-token-sum-norm | sum of all valid token losses        | non-empty seqs * T |

    token-mean weighs every token equally (DAPO, arXiv:2503.14476, "token-level policy gradient
    loss"); seq-mean-token-mean is the original GRPO (1/G sum_i 1/|o_i| sum_t, arXiv:2402.03300
    Eq. 3); seq-mean-token-sum-norm replaces 1/|o_i| by a constant (Dr. GRPO, arXiv:2503.20783
    Fig. 1) so that length does not rescale the per-token gradient. A fully masked row adds 0 to
    the numerator and is not counted as a sequence.

    Args:
        loss_mat: (B, T) per-token loss.
        mask: (B, T) bool or 0/1.
        mode: one of AGG_MODES.
        normaliser: replaces the default denominator; use a global one (see `loss_normaliser`)
            for data-parallel invariance, or any constant. The caller keeps it positive.
    """
    if normaliser is None:
        normaliser = loss_normaliser(mask, mode).clamp_min(1)
    else:
        _check_mode(mode)
    if mode == "seq-mean-token-mean":
        per_seq = masked_sum(loss_mat, mask, dim=-1) / _count(loss_mat, mask, dim=-1).clamp_min(1)  # (B,)
        numerator = per_seq.sum()
    else:
        numerator = masked_sum(loss_mat, mask)
    return numerator / normaliser


def _check_mode(mode: str) -> None:
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; valid modes: {', '.join(AGG_MODES)}")
