"""Masked reductions, whitening and loss aggregation."""

import math

import pytest
import torch

from align.core import AGG_MODES, aggregate_loss, loss_normaliser, masked_mean, masked_sum, masked_var, masked_whiten

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)


def test_masked_sum_and_mean_by_hand():
    """Selected: row 0 -> 1, 2; row 1 -> 4. Sum 7 over 3 elements, mean 7/3.
    Per row: sums (3, 4), means (1.5, 4)."""
    assert masked_sum(X, M).item() == pytest.approx(7.0)
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3)
    torch.testing.assert_close(masked_sum(X, M, dim=-1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(X, M, dim=-1), torch.tensor([1.5, 4.0]))


def test_float_mask_equals_bool_mask():
    torch.testing.assert_close(masked_mean(X, M.float()), masked_mean(X, M))


def test_nan_and_inf_in_padding_do_not_leak():
    x = X.clone()
    x[0, 2], x[1, 1], x[1, 2] = float("nan"), float("inf"), -float("inf")
    assert masked_sum(x, M).item() == pytest.approx(7.0)
    assert masked_mean(x, M).item() == pytest.approx(7.0 / 3)
    assert torch.isfinite(masked_var(x, M))
    assert torch.isfinite(masked_whiten(x, M)).all()


def test_fully_masked_row_gives_zero_not_nan():
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masked_mean(X, mask, dim=-1), torch.tensor([2.0, 0.0]))
    empty = torch.zeros_like(mask)
    assert masked_mean(X, empty).item() == 0.0
    assert masked_var(X, empty).item() == 0.0


def test_masked_var_by_hand():
    """Selected values 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5.
    Biased variance 5/4 = 1.25, unbiased 5/3."""
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(1.25)
    assert masked_var(x, mask, unbiased=True).item() == pytest.approx(5.0 / 3)


def test_masked_var_of_one_element_is_zero():
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert masked_var(X, mask, unbiased=True).item() == 0.0


def test_masked_whiten_by_hand():
    """Selected values 1, 2, 3, 4 (mean 2.5, unbiased var 5/3): whitened = (x - 2.5) / sqrt(5/3),
    i.e. -1.161895, -0.387298, 0.387298, 1.161895; padding comes back as 0.
    Without mean shift the mean 2.5 is added back."""
    x = torch.tensor([[1.0, 2.0, 99.0], [3.0, 4.0, -99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    s = math.sqrt(5.0 / 3)
    expected = torch.tensor([[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 1.5 / s, 0.0]])
    torch.testing.assert_close(masked_whiten(x, mask, eps=0.0), expected)
    expected_no_shift = torch.where(mask, expected + 2.5, torch.zeros(()))
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False, eps=0.0), expected_no_shift)


def test_masked_whiten_of_constant_values_is_exactly_zero():
    """0.1 is not representable: the fp32 mean of seven copies can differ from 0.1 by an ulp,
    which 1/sqrt(1e-8) would blow up to ~1e-4. Constant input must give exact zeros."""
    x = torch.full((1, 7), 0.1)
    out = masked_whiten(x, torch.ones_like(x, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(x))


LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
LOSS_MASK = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize(
    "mode, expected",
    [
        # valid token losses 1, 2, 3 | 4: sum 10 over 4 tokens
        ("token-mean", 10.0 / 4),
        # per-sequence sums 6 and 4, mean over 2 sequences
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),
        # per-sequence means 2 and 4, mean over 2 sequences
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),
        # Dr. GRPO: sum 10 over 2 sequences * constant T = 3
        ("seq-mean-token-sum-norm", 10.0 / (2 * 3)),
    ],
)
def test_aggregate_loss_modes_by_hand(mode, expected):
    assert aggregate_loss(LOSS, LOSS_MASK, mode).item() == pytest.approx(expected)


def test_aggregate_loss_normaliser_override():
    """token-mean with a global token count of 8: 10 / 8."""
    assert aggregate_loss(LOSS, LOSS_MASK, "token-mean", normaliser=8).item() == pytest.approx(1.25)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_row_is_not_counted_as_a_sequence(mode):
    """A third, fully masked row adds nothing to any numerator nor to the sequence count; only
    Dr. GRPO's constant (T) stays as it is, since T does not change."""
    loss = torch.cat([LOSS, torch.full((1, 3), 100.0)])
    mask = torch.cat([LOSS_MASK, torch.zeros(1, 3, dtype=torch.bool)])
    torch.testing.assert_close(aggregate_loss(loss, mask, mode), aggregate_loss(LOSS, LOSS_MASK, mode))


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate_loss(LOSS, LOSS_MASK, "mean")


def _random_batch(seed, batch=8, width=6):
    g = torch.Generator().manual_seed(seed)
    loss = torch.randn(batch, width, generator=g)
    lengths = torch.randint(0, width + 1, (batch,), generator=g)
    lengths[0] = width  # at least one full row
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return loss, mask


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", AGG_MODES)
def test_data_parallel_shards_sum_to_the_whole_batch(seed, mode):
    """Two ranks each hold half the batch, padded to their own width (the second trims trailing
    all-pad columns). With the all-reduced (summed) `loss_normaliser` and a shared Dr. GRPO
    constant, the two shard losses add up to the loss of the whole batch, and so do their
    gradients: 2 ranks x 4 equals 1 x 8 (the same holds for 2 x 4 gradient accumulation)."""
    loss, mask = _random_batch(seed)
    max_len = loss.shape[1]
    whole_leaf = loss.clone().requires_grad_()
    whole = aggregate_loss(whole_leaf, mask, mode, normaliser=loss_normaliser(mask, mode, max_len).clamp_min(1))
    whole.backward()

    shards = [(loss[:4], mask[:4]), (loss[4:], mask[4:])]
    width = int(mask[4:].sum(-1).max())
    shards[1] = (loss[4:, :width], mask[4:, :width])
    total_norm = sum(loss_normaliser(m, mode, max_len) for _, m in shards).clamp_min(1)
    parts, grads = [], []
    for l, m in shards:
        leaf = l.clone().requires_grad_()
        part = aggregate_loss(leaf, m, mode, normaliser=total_norm)
        part.backward()
        parts.append(part)
        grads.append(torch.nn.functional.pad(leaf.grad, (0, max_len - leaf.shape[1])))
    torch.testing.assert_close(parts[0] + parts[1], whole)
    torch.testing.assert_close(torch.cat(grads), whole_leaf.grad)


def test_default_normalisers_differ_between_shards_which_is_why_a_global_one_exists():
    """token-mean over [3 tokens | 1 token] shards with local normalisers averages 6/3 and 4/1 to
    3.0, but the whole batch is 10/4 = 2.5: the local default is not shard-invariant."""
    a = aggregate_loss(LOSS[:1], LOSS_MASK[:1])
    b = aggregate_loss(LOSS[1:], LOSS_MASK[1:])
    assert ((a + b) / 2).item() == pytest.approx(3.0)
    assert aggregate_loss(LOSS, LOSS_MASK).item() == pytest.approx(2.5)
