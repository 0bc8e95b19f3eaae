"""Group-relative advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++) and GRPO's KL-in-loss term."""

import math
import statistics

import pytest
import torch

from align.core import (
    ADVANTAGE_ESTIMATORS,
    dr_grpo_advantages,
    group_index,
    grpo_advantages,
    grpo_kl_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)

# Two groups of four: A = (1, 0, 1, 0), B = (1, 1, 1, 0).
R = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])


def test_grpo_by_hand():
    """A: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.577350 -> +-0.5 / 0.577350 = +-0.866025.
    B: mean 0.75, deviations (0.25 x3, -0.75), unbiased var (3 * 0.0625 + 0.5625) / 3 = 0.25,
    std 0.5 -> (0.5, 0.5, 0.5, -1.5)."""
    adv, stats = grpo_advantages(R, 4)
    s = 0.866025
    torch.testing.assert_close(adv, torch.tensor([s, -s, s, -s, 0.5, 0.5, 0.5, -1.5]), atol=1e-5, rtol=0)
    assert stats["zero_std_group_frac"].item() == 0.0
    assert stats["reward_mean"].item() == pytest.approx(5 / 8)


def test_grpo_without_std_and_dr_grpo_are_the_centred_rewards():
    """A: 1 - 0.5 = 0.5, 0 - 0.5 = -0.5. B: 1 - 0.75 = 0.25, 0 - 0.75 = -0.75."""
    expected = torch.tensor([0.5, -0.5, 0.5, -0.5, 0.25, 0.25, 0.25, -0.75])
    torch.testing.assert_close(dr_grpo_advantages(R, 4)[0], expected)
    torch.testing.assert_close(grpo_advantages(R, 4, scale_by_std=False)[0], expected)


def test_rloo_by_hand():
    """r_i minus the mean of the other three. A: 1 - 1/3 = 2/3, 0 - 2/3 = -2/3.
    B: 1 - 2/3 = 1/3 for each 1, 0 - 1 = -1 for the 0."""
    expected = torch.tensor([2 / 3, -2 / 3, 2 / 3, -2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0])
    torch.testing.assert_close(rloo_advantages(R, 4)[0], expected)


def test_reinforce_pp_by_hand():
    """Global whitening of (1, 2, 3, 4): mean 2.5, unbiased var 5/3, std 1.290994:
    (-1.161895, -0.387298, 0.387298, 1.161895). The group is ignored without the baseline."""
    adv, _ = reinforce_pp_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2)
    s = math.sqrt(5 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]))


def test_reinforce_pp_with_group_baseline_by_hand():
    """Groups (1, 3) and (10, 14): centred (-1, 1, -2, 2), mean 0, unbiased var 10/3,
    std 1.825742 -> (-0.547723, 0.547723, -1.095445, 1.095445)."""
    adv, _ = reinforce_pp_advantages(torch.tensor([1.0, 3.0, 10.0, 14.0]), 2, subtract_group_mean=True)
    s = math.sqrt(10 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 1 / s, -2 / s, 2 / s]))
    with pytest.raises(ValueError, match="group"):
        reinforce_pp_advantages(torch.ones(4), None, subtract_group_mean=True)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_equal_rewards_give_exact_zeros_never_nan(name):
    """0.1 is not representable in fp32, so a group mean can be off by an ulp; std ~ 1e-9 then
    turns that into ~1e-3 without the all-equal guard. Group of seven 0.1s, and a batch where one
    group is constant and the other is not."""
    fn = ADVANTAGE_ESTIMATORS.get(name)
    adv, _ = fn(torch.full((7,), 0.1), 7)
    assert torch.equal(adv, torch.zeros(7))
    if name != "reinforce_pp":  # reinforce_pp whitens the batch globally; groups do not matter
        mixed = torch.tensor([0.1] * 7 + [0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
        adv, stats = fn(mixed, 7)
        assert torch.equal(adv[:7], torch.zeros(7)) and (adv[7:] != 0).all()
        assert stats["zero_std_group_frac"].item() == 0.5


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_groups_of_one_give_zero(name):
    adv, _ = ADVANTAGE_ESTIMATORS.get(name)(torch.tensor([3.0, -1.0, 5.0]), 1)
    assert torch.equal(adv, torch.zeros(3))


def test_integer_rewards_are_accepted():
    torch.testing.assert_close(grpo_advantages(R.long(), 4)[0], grpo_advantages(R, 4)[0])


def _naive(name, rewards, ids, eps=1e-6):
    """One group at a time with Python's statistics module."""
    rewards, ids = rewards.tolist(), ids.tolist()
    if name == "reinforce_pp":
        mean, std = statistics.fmean(rewards), statistics.stdev(rewards) if len(rewards) > 1 else 0.0
        return torch.tensor([0.0 if std == 0 else (r - mean) / math.sqrt(std**2 + 1e-8) for r in rewards], dtype=torch.float64)
    out = []
    for r, gid in zip(rewards, ids):
        group = [x for x, g in zip(rewards, ids) if g == gid]
        k, mean = len(group), statistics.fmean(group)
        if max(group) == min(group):
            out.append(0.0)
        elif name == "grpo":
            out.append((r - mean) / (statistics.stdev(group) + eps))
        elif name == "dr_grpo":
            out.append(r - mean)
        else:  # rloo
            out.append(r - (sum(group) - r) / (k - 1))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_vectorised_estimators_match_a_naive_loop(seed, name):
    """Shuffled, non-contiguous group ids with sizes 1 to 5 and arbitrary id values; binary
    rewards (so some groups are constant) mixed with real-valued ones."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (6,), generator=g)
    ids = torch.repeat_interleave(torch.arange(6) * 10 + 7, sizes)
    ids = ids[torch.randperm(len(ids), generator=g)]
    rewards = torch.randint(0, 2, (len(ids),), generator=g).double()
    rewards[::3] += torch.randn(len(rewards[::3]), generator=g, dtype=torch.float64)
    adv, _ = ADVANTAGE_ESTIMATORS.get(name)(rewards, ids)
    torch.testing.assert_close(adv, _naive(name, rewards, ids))


def test_int_group_size_equals_explicit_consecutive_ids():
    ids = torch.tensor([5, 5, 5, 5, 2, 2, 2, 2])
    torch.testing.assert_close(grpo_advantages(R, 4)[0], grpo_advantages(R, ids)[0])


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match="does not divide"):
        grpo_advantages(R, 3)
    with pytest.raises(ValueError, match="shape"):
        grpo_advantages(R, torch.zeros(5, dtype=torch.long))
    index, k = group_index(torch.tensor([9, 3, 9]), 3)
    assert k == 2 and index.tolist() == [1, 0, 1]


def test_grpo_kl_loss_by_hand():
    """logp - ref = ln 2 on three valid tokens (a fourth is padding with junk, NaN in the
    reference): k3 = 0.5 - 1 + ln 2 = 0.193147 each, token mean 0.193147. Gradient per valid
    token (1 - e^{-ln 2}) / 3 = 1/6, and exactly 0 (not NaN) on the padding."""
    logp = torch.tensor([[math.log(2.0)] * 3 + [50.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    loss, stats = grpo_kl_loss(logp, torch.tensor([[0.0, 0.0, 0.0, float("nan")]]), mask)
    assert loss.item() == pytest.approx(0.5 - 1 + math.log(2.0))
    assert stats["kl"].item() == pytest.approx(loss.item())
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[1 / 6, 1 / 6, 1 / 6, 0.0]]))
