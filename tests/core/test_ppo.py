"""PPO pieces: token rewards, GAE, clipped policy loss (clip-higher, dual-clip), value loss."""

import math

import pytest
import torch

from align.core import POLICY_LOSSES, gae_advantages, ppo_policy_loss, ppo_value_loss, token_rewards

# ---------------------------------------------------------------- token rewards


def test_token_rewards_by_hand():
    """logp - ref = 0.1 on every token, k1, beta = 0.5: -0.05 per valid token. Scores 1 and 2 go
    to the last valid token (index 2 of row 0, index 1 of row 1). Per-sequence KL 0.3 and 0.2:
    stats kl = 0.25, score = 1.5, non_score_reward = -0.5 * 0.25 = -0.125."""
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    ref = torch.zeros(2, 3)
    rewards, stats = token_rewards(torch.tensor([1.0, 2.0]), ref + 0.1, ref, mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 0.95], [-0.05, 1.95, 0.0]]))
    assert stats["kl"].item() == pytest.approx(0.25)
    assert stats["score"].item() == pytest.approx(1.5)
    assert stats["non_score_reward"].item() == pytest.approx(-0.125)


def test_token_rewards_length_one_and_empty_rows():
    """Length 1: score and KL share index 0 (3 - 0.05). Empty row: all zeros, score dropped."""
    mask = torch.tensor([[1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    logp = torch.full((2, 3), 0.1)
    rewards, _ = token_rewards(torch.tensor([3.0, 7.0]), logp, torch.zeros(2, 3), mask, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[2.95, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- GAE


def test_gae_by_hand():
    """gamma 0.9, lam 0.8 (gamma * lam = 0.72), rewards (0, 0, 1), values 0.5 each, then a pad
    column holding garbage (100) that must count as 0.
    deltas: d2 = 1 + 0 - 0.5 = 0.5; d1 = d0 = 0 + 0.9 * 0.5 - 0.5 = -0.05.
    A2 = 0.5; A1 = -0.05 + 0.72 * 0.5 = 0.31; A0 = -0.05 + 0.72 * 0.31 = 0.1732.
    returns = A + V = (0.6732, 0.81, 1.0)."""
    rewards = torch.tensor([[0.0, 0.0, 1.0, 100.0]])
    values = torch.tensor([[0.5, 0.5, 0.5, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.1732, 0.31, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.6732, 0.81, 1.0, 0.0]]))


def _naive_gae(rewards, values, mask, gamma, lam):
    """Textbook sum form, one scalar at a time: A_t = sum_l (gamma lam)^l delta_{t+l} over the
    valid prefix of length L, with V_L = 0."""
    B, T = rewards.shape
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        L = int(mask[b].sum())
        r = [float(x) for x in rewards[b, :L]]
        v = [float(x) for x in values[b, :L]] + [0.0]
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(L)]
        for t in range(L):
            adv[b][t] = sum((gamma * lam) ** l * deltas[t + l] for l in range(L - t))
            ret[b][t] = adv[b][t] + v[t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_naive_loop_across_padding_patterns(seed, gamma, lam):
    """Right-padded lengths include 0 (empty), 1 and the full width; padding holds random junk."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[:3] = torch.tensor([0, 1, T])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = _naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_skips_interior_masked_tokens_as_if_they_were_not_there(seed):
    """A multi-turn row's environment tokens (mask 0 inside the row): GAE equals the textbook
    recursion on the row with those positions removed, scattered back; 0 on them."""
    g = torch.Generator().manual_seed(seed)
    B, T = 5, 9
    mask = torch.rand(B, T, generator=g) < 0.6
    mask[0] = torch.tensor([1, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    mask[1] = False
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae_advantages(rewards, values, mask, 0.9, 0.8)
    for b in range(B):
        keep = mask[b].nonzero().squeeze(-1)
        n = len(keep)
        ref_adv, ref_ret = _naive_gae(rewards[b:b + 1, keep], values[b:b + 1, keep], torch.ones(1, n, dtype=torch.bool),
                                      0.9, 0.8)
        torch.testing.assert_close(adv[b, keep], ref_adv[0])
        torch.testing.assert_close(ret[b, keep], ref_ret[0])
        assert (adv[b, ~mask[b]] == 0).all() and (ret[b, ~mask[b]] == 0).all()


def test_gae_with_zero_values_and_lambda_one_is_discounted_return():
    """rewards (1, 2, 3), gamma 0.5: returns-to-go 1 + 0.5*2 + 0.25*3 = 2.75, 2 + 1.5 = 3.5, 3."""
    adv, _ = gae_advantages(torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), torch.ones(1, 3), 0.5, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.75, 3.5, 3.0]]))


def test_gae_carries_no_gradient():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae_advantages(torch.randn(2, 3), values, torch.ones(2, 3), 0.9, 0.9)
    assert not adv.requires_grad and not ret.requires_grad


# ---------------------------------------------------------------- policy loss


def _policy(log_ratio, adv, **kw):
    logp = torch.tensor([[float(log_ratio)]], requires_grad=True)
    loss, stats = ppo_policy_loss(logp, torch.zeros(1, 1), torch.tensor([[float(adv)]]), torch.ones(1, 1), **kw)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_ratio_one_is_minus_mean_advantage():
    """ratio 1: per-token loss -A = (-1, 2), token mean 0.5; nothing clipped, approx KL 0."""
    logp = torch.zeros(1, 2)
    loss, stats = ppo_policy_loss(logp, logp, torch.tensor([[1.0, -2.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(0.5)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0
    assert stats["ratio_mean"].item() == 1.0


def test_positive_advantage_clipped_above():
    """A = 1, ratio e^0.5 = 1.6487 > 1.2: max(-1.6487, -1.2) = -1.2, constant in logp: grad 0."""
    loss, grad, stats = _policy(0.5, 1.0)
    assert loss == pytest.approx(-1.2)
    assert grad == 0.0
    assert stats["clipfrac"].item() == 1.0 and stats["clipfrac_high"].item() == 1.0
    assert stats["clipfrac_low"].item() == 0.0


def test_negative_advantage_clipped_below():
    """A = -1, ratio 0.5 < 0.8: max(0.5, 0.8) = 0.8, grad 0."""
    loss, grad, stats = _policy(math.log(0.5), -1.0)
    assert loss == pytest.approx(0.8)
    assert grad == 0.0
    assert stats["clipfrac_low"].item() == 1.0


def test_clip_higher_lets_a_positive_advantage_grow_further():
    """A = 1, ratio 1.25. Symmetric eps 0.2: clipped at -1.2, grad 0. DAPO eps_high 0.28: -1.25
    unclipped, d(-ratio)/dlogp = -ratio = -1.25."""
    loss, grad, _ = _policy(math.log(1.25), 1.0)
    assert (loss, grad) == (pytest.approx(-1.2), 0.0)
    loss, grad, stats = _policy(math.log(1.25), 1.0, clip_eps_low=0.2, clip_eps_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
    assert stats["clipfrac"].item() == 0.0


def test_dual_clip_caps_a_negative_advantage():
    """A = -1, ratio 4: standard PPO max(4, 1.2) = 4 with grad ratio = 4; dual-clip c = 3 caps the
    loss at -A * c = 3, grad 0."""
    loss, grad, _ = _policy(math.log(4.0), -1.0)
    assert (loss, grad) == (pytest.approx(4.0), pytest.approx(4.0))
    loss, grad, stats = _policy(math.log(4.0), -1.0, dual_clip=3.0)
    assert (loss, grad) == (pytest.approx(3.0), 0.0)
    assert stats["dual_clipfrac"].item() == 1.0


def test_dual_clip_leaves_positive_advantages_alone():
    """A = +1, ratio 4: clipped to -1.2 with or without dual-clip."""
    assert _policy(math.log(4.0), 1.0, dual_clip=3.0)[0] == pytest.approx(-1.2)


def test_dual_clip_must_exceed_one():
    with pytest.raises(ValueError, match="dual_clip"):
        _policy(0.0, 1.0, dual_clip=1.0)


def test_approx_kl_by_hand():
    """log-ratio ln 2: (ratio - 1) - log ratio = 1 - 0.693147 = 0.306853."""
    assert _policy(math.log(2.0), 1.0)[2]["approx_kl"].item() == pytest.approx(1 - math.log(2.0))


def test_gradient_direction_follows_the_advantage():
    """At ratio 1 the loss gradient is -A: a descent step raises logp for A > 0, lowers it for A < 0."""
    assert _policy(0.0, 2.0)[1] == pytest.approx(-2.0)
    assert _policy(0.0, -3.0)[1] == pytest.approx(3.0)


def test_extreme_log_ratios_stay_finite():
    logp = torch.tensor([[1e4, -1e4, 1e4, -1e4]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, stats = ppo_policy_loss(logp, torch.zeros(1, 4), adv, torch.ones(1, 4))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_masked_tokens_and_aggregation_mode_are_respected():
    """Tokens at ratio 1 with A = (1, 2 | 3, pad): per-token loss (-1, -2 | -3).
    seq-mean-token-sum: (-3 + -3) / 2 = -3; token-mean: -6 / 3 = -2."""
    logp = torch.zeros(2, 2)
    adv = torch.tensor([[1.0, 2.0], [3.0, 50.0]])
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    loss, _ = ppo_policy_loss(logp, logp, adv, mask, agg="seq-mean-token-sum")
    assert loss.item() == pytest.approx(-3.0)
    assert ppo_policy_loss(logp, logp, adv, mask)[0].item() == pytest.approx(-2.0)
    # the normaliser is forwarded: token sum -6 over a global 12 tokens
    assert ppo_policy_loss(logp, logp, adv, mask, normaliser=12)[0].item() == pytest.approx(-0.5)


def test_nan_in_padding_reaches_neither_loss_nor_gradient():
    """Junk (NaN) in padded advantages, old log-probs and returns: loss and gradients stay finite."""
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    nan = float("nan")
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = ppo_policy_loss(logp, torch.tensor([[0.0, 0.0, nan]]), torch.tensor([[1.0, 1.0, nan]]), mask)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and torch.isfinite(logp.grad).all()
    values = torch.zeros(1, 3, requires_grad=True)
    loss, _ = ppo_value_loss(values, torch.tensor([[0.0, 0.0, nan]]), torch.tensor([[1.0, 1.0, nan]]), mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(values.grad).all()


def test_registry_entry_is_the_function():
    assert POLICY_LOSSES.get("ppo") is ppo_policy_loss


# ---------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    """old 1.0, returns 2.0, eps 0.2.
    V = 1.5: V_clip = 1.2; errors 0.25 and 0.64 -> 0.5 * 0.64 = 0.32, clipped branch, grad 0.
    V = 1.1: inside the range; both errors 0.81 -> 0.405, not clipped.
    token mean over both: (0.32 + 0.405) / 2 = 0.3625, vf_clipfrac 1/2."""
    values = torch.tensor([[1.5, 1.1]], requires_grad=True)
    loss, stats = ppo_value_loss(values, torch.ones(1, 2), torch.full((1, 2), 2.0), torch.ones(1, 2))
    assert loss.item() == pytest.approx(0.3625)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # d/dV of 0.5 * (V - 2)^2 / 2 tokens at V = 1.1: (1.1 - 2) / 2 = -0.45; clipped token: 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.45]]))


def test_value_loss_without_clipping():
    """0.5 * (1.5 - 2)^2 = 0.125."""
    loss, stats = ppo_value_loss(torch.tensor([[1.5]]), torch.ones(1, 1), torch.full((1, 1), 2.0), torch.ones(1, 1), clip_eps=None)
    assert loss.item() == pytest.approx(0.125) and stats["vf_clipfrac"].item() == 0.0


def test_explained_variance():
    """Perfect values explain everything (1); a constant guess explains nothing (0); padding ignored."""
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    _, stats = ppo_value_loss(returns.clone(), returns, returns, mask)
    assert stats["explained_variance"].item() == pytest.approx(1.0)
    _, stats = ppo_value_loss(torch.full_like(returns, 2.5), returns, returns, mask, clip_eps=None)
    assert stats["explained_variance"].item() == pytest.approx(0.0)


def test_value_loss_ignores_padding():
    values = torch.tensor([[1.5, float("nan")]])
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    loss, _ = ppo_value_loss(values, torch.ones(1, 2), torch.full((1, 2), 2.0), mask, clip_eps=None)
    assert loss.item() == pytest.approx(0.125)
