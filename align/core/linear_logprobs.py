"""Log-probs and entropies straight from the last hidden states, chunked through the LM head.

`logprobs_from_logits` never holds a second vocabulary-sized tensor, but the logits themselves,
(N, V), live through the backward pass: with V = 151,936 and 8 x 1,024 tokens that is 5 GB in
fp32 before their gradient (another 5 GB). Here the LM head is part of the function: the forward
computes, for a chunk of positions at a time, logits = hidden @ W^T / T, their logsumexp and the
label's log-prob (and entropy), keeps only (N,) statistics, and frees the chunk's logits; the
backward recomputes each chunk's logits and turns d log p / d logits = onehot - softmax (and
dH / d logits = -p (x - E_p[x])) into the hidden states' and W's gradients chunk by chunk. Peak
extra memory is one (chunk, V) fp32 slice, whatever N is; the price is one more (N, H) x (H, V)
matmul in the backward. The idea is that of fused linear cross-entropy kernels (Liger-Kernel,
Hsu et al. 2024, https://arxiv.org/abs/2410.10989, Sec. 3.2; Wijmans et al. 2024, "Cut Your
Losses in Large-Vocabulary Language Models", https://arxiv.org/abs/2411.09009), in plain torch.

Under autocast the matmuls run in the autocast dtype (bf16) in both passes; the softmax
statistics are fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

# Default chunk: about 16M logits (64 MiB of fp32) per slice.
_CHUNK_ELEMENTS = 1 << 24


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, chunk: int,
                want_entropy: bool):
        # hidden (N, H), weight (V, H), labels (N,) with negative = ignored
        N = hidden.shape[0]
        dtype = _compute_dtype(hidden)
        stat = torch.float64 if dtype == torch.float64 else torch.float32  # softmax statistics
        valid = labels >= 0
        safe = labels.clamp_min(0)
        logp = torch.zeros(N, dtype=stat, device=hidden.device)
        lse = torch.zeros(N, dtype=stat, device=hidden.device)
        mean_logit = torch.zeros(N, dtype=stat, device=hidden.device) if want_entropy else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, chunk):
                x = (hidden[s : s + chunk].to(dtype) @ w.T).to(stat) / temperature  # (n, V): the one big temporary
                lse[s : s + chunk] = torch.logsumexp(x, dim=-1)
                logp[s : s + chunk] = x.gather(-1, safe[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
                if want_entropy:
                    p = torch.exp(x - lse[s : s + chunk, None])
                    mean_logit[s : s + chunk] = (p * x).sum(-1)
        logp = torch.where(valid, logp, torch.zeros_like(logp))
        entropy = lse - mean_logit if want_entropy else torch.zeros_like(lse)
        ctx.save_for_backward(hidden, weight, safe, valid, lse, mean_logit if want_entropy else lse)
        ctx.temperature, ctx.chunk, ctx.want_entropy, ctx.dtype = temperature, chunk, want_entropy, dtype
        return logp, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, g_logp: Tensor, g_entropy: Tensor):
        hidden, weight, labels, valid, lse, mean_logit = ctx.saved_tensors
        T, chunk, dtype = ctx.temperature, ctx.chunk, ctx.dtype
        stat = lse.dtype
        g_logp = torch.where(valid, g_logp, torch.zeros_like(g_logp)).to(stat)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=stat, device=weight.device) if ctx.needs_input_grad[1] else None
        w = weight.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(dtype)
                x = (h @ w.T).to(stat) / T  # (n, V), recomputed
                p = torch.exp(x - lse[s : s + chunk, None])
                g = g_logp[s : s + chunk, None]
                d = p.mul(-g)  # d log p[y] / dx = onehot(y) - p
                d.scatter_add_(-1, labels[s : s + chunk, None], g)
                if ctx.want_entropy:  # dH / dx = -p (x - E_p[x])
                    d -= g_entropy[s : s + chunk, None].to(stat) * p * (x - mean_logit[s : s + chunk, None])
                d = (d / T).to(dtype)  # through the temperature: x = logits / T
                if grad_hidden is not None:
                    grad_hidden[s : s + chunk] = (d @ w).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += (d.T @ h).to(stat)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(hidden @ weight^T / temperature)[label] per position, and optionally the
    entropy of each distribution, without materialising the (N, V) logits for the backward.

    Equal in value and gradient (hidden and weight) to `logprobs_from_logits(lm_head(hidden) /
    temperature, labels)` (and `entropy_from_logits`) up to float rounding; differentiable once.

    Args:
        hidden: (..., H) last hidden states (position t scores labels[..., t]).
        weight: (V, H) the LM head's weight (no bias).
        labels: (...) token ids in [0, V); negative ids give 0 and no gradient.
        temperature: logits are divided by it (> 0).
        entropy: also return the entropies.
        chunk_size: positions per slice; default keeps a (chunk, V) slice near 16M elements.

    Returns:
        (...) fp32 log-probs (fp64 for fp64 inputs), and with `entropy` also (...) entropies in nats.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = labels.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or max(1, _CHUNK_ELEMENTS // max(weight.shape[0], 1))
    logp, ent = _LinearLogProbs.apply(h, weight, labels.reshape(-1), float(temperature), int(chunk), entropy)
    return (logp.reshape(shape), ent.reshape(shape)) if entropy else logp.reshape(shape)
