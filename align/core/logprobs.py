"""Per-token log-probabilities and entropies from logits, chunked over rows.

`log_softmax(logits).gather(labels)` materialises a second (B, T, V) tensor, and autograd keeps
it for the backward pass: with V = 150k and 8k tokens that is ~5 GB in fp32. Here each quantity
is an autograd Function that walks over (row-chunk, V) slices of the logits:

- forward keeps only the logits (already alive: the model produced them) and (B, T) statistics;
- backward recomputes the softmax one chunk at a time and writes the gradient, which has the
  logits' shape and dtype by definition, straight into a single buffer.

So the only full-vocabulary temporary is one (chunk_size, V) fp32 slice. Results are computed
in float32 (float64 if the logits are float64) whatever the logits' dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Default chunk: about 16M elements (64 MiB of fp32) per (rows, V) slice.
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(shape: torch.Size, chunk_size: int | None):
    """(b, time-slice) pairs covering a (B, T, V) tensor, at most `chunk_size` rows each.

    Slicing one batch row at a time keeps every chunk a view even when the logits are a
    non-contiguous slice such as `logits[:, :-1]` (flattening those would copy all of them).
    """
    B, T, V = shape
    rows = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(V, 1))
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for b in range(B):
        for t0 in range(0, T, rows):
            yield b, slice(t0, min(t0 + rows, T))


class _ChosenLogProbs(torch.autograd.Function):
    """log p(label) = logit[label] - logsumexp(logits); d/dlogits = onehot(label) - softmax."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, chunk_size: int | None) -> Tensor:
        # logits (B, T, V); labels (B, T), negative = ignored
        B, T, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        valid = labels >= 0
        safe_labels = labels.clamp_min(0)
        out = torch.zeros(B, T, dtype=dtype, device=logits.device)
        lse = torch.zeros(B, T, dtype=dtype, device=logits.device)
        for b, ts in _chunks(logits.shape, chunk_size):
            x = logits[b, ts].to(dtype)  # (n, V): the one full-vocab temporary
            lse[b, ts] = torch.logsumexp(x, dim=-1)
            out[b, ts] = x.gather(-1, safe_labels[b, ts, None]).squeeze(-1) - lse[b, ts]
        out = torch.where(valid, out, torch.zeros_like(out))
        ctx.save_for_backward(logits, safe_labels, valid, lse)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, labels, valid, lse = ctx.saved_tensors
        grad_out = torch.where(valid, grad_out, torch.zeros_like(grad_out))  # (B, T)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, ts in _chunks(logits.shape, ctx.chunk_size):
            x = logits[b, ts].to(lse.dtype)  # (n, V)
            g = grad_out[b, ts, None].to(lse.dtype)  # (n, 1)
            d = torch.exp(x - lse[b, ts, None]).mul_(-g)  # -softmax * g
            d.scatter_add_(-1, labels[b, ts, None], g)  # + onehot(label) * g
            grad[b, ts] = d
        return grad, None, None


class _Entropy(torch.autograd.Function):
    """H = logsumexp(x) - sum_j p_j x_j; dH/dx_j = -p_j (x_j - sum_k p_k x_k)."""

    @staticmethod
    def forward(ctx, logits: Tensor, chunk_size: int | None) -> Tensor:
        B, T, _ = logits.shape
        dtype = _compute_dtype(logits.dtype)
        lse = torch.zeros(B, T, dtype=dtype, device=logits.device)
        mean_logit = torch.zeros(B, T, dtype=dtype, device=logits.device)  # E_p[x]
        for b, ts in _chunks(logits.shape, chunk_size):
            x = logits[b, ts].to(dtype)  # (n, V)
            lse[b, ts] = torch.logsumexp(x, dim=-1)
            p = torch.exp(x - lse[b, ts, None])
            mean_logit[b, ts] = (p * x).sum(-1)
        ctx.save_for_backward(logits, lse, mean_logit)
        ctx.chunk_size = chunk_size
        return lse - mean_logit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, lse, mean_logit = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for b, ts in _chunks(logits.shape, ctx.chunk_size):
            x = logits[b, ts].to(lse.dtype)  # (n, V)
            p = torch.exp(x - lse[b, ts, None])
            centred = x - mean_logit[b, ts, None]
            grad[b, ts] = -(grad_out[b, ts, None].to(lse.dtype) * p * centred)
        return grad, None


def _as_3d(logits: Tensor) -> Tensor:
    if logits.dim() == 2:
        return logits.unsqueeze(0)  # (1, N, V), a view
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V) or (N, V), got shape {tuple(logits.shape)}")
    return logits


def logprobs_from_logits(logits: Tensor, labels: Tensor, chunk_size: int | None = None) -> Tensor:
    """log softmax(logits)[label] per position, without a second full-vocabulary tensor.

    Position t of `logits` scores `labels[:, t]`: the caller does the causal shift
    (`logits[:, :-1]` against `input_ids[:, 1:]`; a non-contiguous slice is fine, it is not
    copied). Exact against `log_softmax(logits).gather(...)` up to float rounding, and
    differentiable once (no double backward).

    Args:
        logits: (B, T, V) or (N, V), any float dtype.
        labels: (B, T) or (N,) int64 token ids in [0, V); a negative id (e.g. -100) yields 0 and
            no gradient, so HF-style ignore labels need no special casing.
        chunk_size: rows (positions) per slice; default keeps a slice near 16M elements.

    Returns:
        (B, T) or (N,) log-probabilities in float32 (float64 for float64 logits).
    """
    logits3 = _as_3d(logits)
    out = _ChosenLogProbs.apply(logits3, labels.reshape(logits3.shape[:2]), chunk_size)
    return out.reshape(labels.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int | None = None) -> Tensor:
    """Entropy of softmax(logits) per position, H = logsumexp(x) - sum_j softmax(x)_j x_j.

    Same chunking and memory behaviour as `logprobs_from_logits`; logits must be finite.

    Args:
        logits: (B, T, V) or (N, V), any float dtype.
        chunk_size: rows (positions) per slice; default keeps a slice near 16M elements.

    Returns:
        (B, T) or (N,) entropies in nats, float32 (float64 for float64 logits).
    """
    logits3 = _as_3d(logits)
    out = _Entropy.apply(logits3, chunk_size)
    return out.reshape(logits.shape[:-1])
