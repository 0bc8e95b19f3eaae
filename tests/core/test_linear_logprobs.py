"""Chunked log-probs and entropies through the LM head, against the full-logits path."""

import pytest
import torch

from align.core.linear_logprobs import linear_logprobs
from align.core.logprobs import entropy_from_logits, logprobs_from_logits


def _inputs(seed=0, B=3, T=11, H=16, V=97, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.5).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 7, None])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_equal_the_full_path(chunk, temperature):
    """Loss = sum(a * logp) + sum(b * entropy) with random a, b, so every gradient path is used:
    the chunked function's value and its gradients for the hidden states AND the head's weight
    equal those of the full (B, T, V) logits (float64: to 1e-10)."""
    hidden, weight, labels = _inputs()
    labels[0, 3] = -100  # ignored: 0 and no gradient
    a, b = torch.randn(labels.shape, dtype=torch.float64), torch.randn(labels.shape, dtype=torch.float64)
    logp, ent = linear_logprobs(hidden, weight, labels, temperature, entropy=True, chunk_size=chunk)
    grads = torch.autograd.grad((a * logp).sum() + (b * ent).sum(), (hidden, weight))

    logits = hidden @ weight.T / temperature
    ref_logp = logprobs_from_logits(logits, labels)
    ref_ent = entropy_from_logits(logits)
    ref_grads = torch.autograd.grad((a * ref_logp).sum() + (b * ref_ent).sum(), (hidden, weight))
    torch.testing.assert_close(logp, ref_logp, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ent, ref_ent, atol=1e-10, rtol=1e-10)
    assert logp[0, 3] == 0
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_log_probs_only_and_a_frozen_head():
    """Without entropy, and with a head that needs no gradient (a frozen LoRA base): only the
    hidden states get one, equal to the full path's."""
    hidden, weight, labels = _inputs(1, dtype=torch.float32)
    weight = weight.detach()
    logp = linear_logprobs(hidden, weight, labels, chunk_size=5)
    (g,) = torch.autograd.grad(logp.sum(), hidden)
    ref = logprobs_from_logits(hidden @ weight.T, labels)
    (g_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_under_bf16_autocast_it_tracks_fp32():
    """Under bf16 autocast the head's matmul runs in bf16 (as the full path's would): the
    log-probs stay within bf16 rounding of fp32's."""
    hidden, weight, labels = _inputs(2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = linear_logprobs(hidden, weight, labels)
    high = linear_logprobs(hidden, weight, labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, high, atol=0.1, rtol=0.05)
    assert not torch.equal(low, high)


def test_rejects_a_bad_temperature():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, labels, temperature=0)
