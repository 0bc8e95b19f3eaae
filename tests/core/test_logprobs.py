"""Chunked log-probs and entropy: exact against the dense formulas, in value and gradient."""

import math

import pytest
import torch

from align.core import entropy_from_logits, logprobs_from_logits

B, T, V = 2, 5, 11


def _inputs(seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    return logits, labels


def _dense_logprobs(logits, labels):
    return torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)


def _dense_entropy(logits):
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def test_logprob_and_entropy_by_hand():
    """logits (0, ln 3): softmax (1/4, 3/4). log p(label 1) = ln(3/4) = -0.287682;
    H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.346574 + 0.215762 = 0.562335."""
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert logprobs_from_logits(logits, torch.tensor([1])).item() == pytest.approx(-0.287682, abs=1e-6)
    assert entropy_from_logits(logits).item() == pytest.approx(0.562335, abs=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 1, 2, 3, 100])
@pytest.mark.parametrize("seed", range(2))
def test_logprobs_match_dense_in_fp32_and_fp64(chunk_size, seed):
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        logits, labels = _inputs(seed, dtype)
        out = logprobs_from_logits(logits, labels, chunk_size=chunk_size)
        assert out.shape == (B, T) and out.dtype == dtype
        torch.testing.assert_close(out, _dense_logprobs(logits, labels), rtol=0, atol=tol)


@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_entropy_matches_dense(chunk_size):
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        logits, _ = _inputs(3, dtype)
        torch.testing.assert_close(
            entropy_from_logits(logits, chunk_size=chunk_size), _dense_entropy(logits), rtol=0, atol=tol
        )


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradients_match_dense(chunk_size):
    """Backward of a weighted sum of the outputs equals autograd through the dense formulas."""
    logits, labels = _inputs(4, torch.float64)
    w = torch.randn(B, T, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for ours, dense in (
        (lambda x: logprobs_from_logits(x, labels, chunk_size), lambda x: _dense_logprobs(x, labels)),
        (lambda x: entropy_from_logits(x, chunk_size), _dense_entropy),
    ):
        a = logits.clone().requires_grad_()
        b = logits.clone().requires_grad_()
        (ours(a) * w).sum().backward()
        (dense(b) * w).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)


def test_gradcheck():
    logits = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[0, 3, 1]])
    assert torch.autograd.gradcheck(lambda x: logprobs_from_logits(x, labels, chunk_size=2), (logits,))
    assert torch.autograd.gradcheck(lambda x: entropy_from_logits(x, chunk_size=2), (logits,))


def test_shifted_non_contiguous_slice_and_2d_input():
    """The usual call: logits[:, :-1] (a non-contiguous view) against input_ids[:, 1:]."""
    logits, ids = _inputs(6)
    out = logprobs_from_logits(logits[:, :-1], ids[:, 1:], chunk_size=2)
    torch.testing.assert_close(out, _dense_logprobs(logits[:, :-1], ids[:, 1:]))
    flat = logprobs_from_logits(logits.reshape(-1, V), ids.reshape(-1))
    torch.testing.assert_close(flat, _dense_logprobs(logits, ids).reshape(-1))
    assert entropy_from_logits(logits.reshape(-1, V)).shape == (B * T,)


def test_bf16_logits_give_fp32_results_and_bf16_grads():
    logits, labels = _inputs(7, torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    out = logprobs_from_logits(leaf, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _dense_logprobs(logits.float(), labels), rtol=0, atol=1e-5)
    out.sum().backward()
    assert leaf.grad.dtype == torch.bfloat16
    ref = logits.float().requires_grad_()
    _dense_logprobs(ref, labels).sum().backward()
    torch.testing.assert_close(leaf.grad.float(), ref.grad, rtol=0, atol=1e-2)  # bf16 rounding of grads


def test_negative_labels_give_zero_and_no_gradient():
    logits, labels = _inputs(8, torch.float64)
    labels[0, 1] = -100
    leaf = logits.clone().requires_grad_()
    out = logprobs_from_logits(leaf, labels)
    assert out[0, 1].item() == 0.0
    out.sum().backward()
    assert torch.count_nonzero(leaf.grad[0, 1]) == 0
    keep = labels >= 0
    torch.testing.assert_close(out[keep], _dense_logprobs(logits, labels.clamp_min(0))[keep])


def test_autograd_keeps_no_second_full_vocabulary_tensor():
    """Everything saved for backward, apart from the logits themselves, is (B, T)-sized: the
    dense log_softmax path would save a second (B, T, V) tensor."""
    logits, labels = _inputs(9)
    leaf = logits.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs_from_logits(leaf, labels, chunk_size=2)
        entropy_from_logits(leaf, chunk_size=2)
    assert saved, "hooks saw nothing: the test would pass vacuously"
    big = [t for t in saved if t.numel() >= B * T * V]
    assert all(t.data_ptr() == leaf.data_ptr() for t in big)
    assert sum(t.numel() for t in saved if t.data_ptr() != leaf.data_ptr()) <= 8 * B * T

    dense_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: dense_saved.append(t) or t, lambda t: t):
        _dense_logprobs(leaf, labels)
    assert any(t.numel() >= B * T * V and t.data_ptr() != leaf.data_ptr() for t in dense_saved)
