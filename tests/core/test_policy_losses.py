"""GSPO, CISPO and the rollout correction's importance weights, each against its paper's formula
written out as a plain loop (values and gradients)."""

import math

import pytest
import torch

from align.core import (
    POLICY_LOSSES,
    cispo_policy_loss,
    gspo_policy_loss,
    ppo_policy_loss,
    rollout_correction,
)


def _batch(seed: int = 0, B: int = 5, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([7, 3, 1, 5, 4])[:B]
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.3).requires_grad_()
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask  # a sequence advantage over its tokens
    return logp, old, adv, mask


def test_registry_holds_the_three_policy_losses():
    assert {"ppo", "gspo", "cispo"} <= set(POLICY_LOSSES.names())
    assert POLICY_LOSSES.get("gspo") is gspo_policy_loss and POLICY_LOSSES.get("cispo") is cispo_policy_loss


@pytest.mark.parametrize("eps", [(3e-4, 4e-4), (0.05, 0.08), (10.0, 10.0)])
def test_gspo_equals_the_sequence_level_objective(eps):
    """Zheng et al. 2025, Eq. 5 and 7, as a loop over sequences: s_i = exp(mean_t(logp - old)),
    l_i = max(-A_i s_i, -A_i clip(s_i, 1-eps_l, 1+eps_h)), loss = mean_i l_i. The per-token
    GSPO-token form with seq-mean-token-mean must give the same value and the same gradient
    (the gradient of s_i itself, computed by autograd through the loop)."""
    logp, old, adv, mask = _batch()
    loss, stats = gspo_policy_loss(logp, old, adv, mask, *eps, agg="seq-mean-token-mean")
    grad = torch.autograd.grad(loss, logp)[0]

    naive_logp = logp.detach().clone().requires_grad_()
    terms = []
    for i in range(len(mask)):
        n = int(mask[i].sum())
        s = torch.exp((naive_logp[i, :n] - old[i, :n]).mean())
        a = adv[i, 0]
        terms.append(torch.maximum(-a * s, -a * s.clamp(1 - eps[0], 1 + eps[1])))
    naive = torch.stack(terms).mean()
    naive.backward()
    torch.testing.assert_close(loss, naive)
    torch.testing.assert_close(grad, naive_logp.grad)
    assert grad[~mask].abs().max() == 0
    assert 0 <= stats["clipfrac"] <= 1


def test_gspo_clips_whole_sequences_not_tokens():
    """One sequence whose mean log-ratio is +0.01 (s = 1.01 > 1 + 4e-4) with A > 0: every one
    of its tokens is on the clipped branch, so none gets a gradient, even tokens whose own
    ratio is below 1 (a token-level PPO clip would keep those)."""
    old = torch.zeros(1, 4)
    logp = torch.tensor([[0.05, -0.02, 0.03, -0.02]], requires_grad=True)  # mean 0.01
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.ones(1, 4)
    loss, stats = gspo_policy_loss(logp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    assert grad.abs().max() == 0
    assert stats["clipfrac"] == 1
    ppo, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps_low=4e-4, clip_eps_high=4e-4)
    (ppo_grad,) = torch.autograd.grad(ppo, logp)
    assert (ppo_grad[0, [1, 3]] != 0).all()


def test_cispo_equals_the_paper_formula():
    """MiniMax-M1 Eq. 4-5 as a loop over tokens: l = -sg(clip(r, 1-eps_l, 1+eps_h)) * A * logp,
    averaged over all valid tokens. Gradient per token: -clip(r) * A / N. Tokens whose ratio is
    clipped still get a gradient (PPO would give them none)."""
    logp, old, adv, mask = _batch(1)
    with torch.no_grad():
        logp[0, 0] = old[0, 0] + 1.0  # ratio e > 1.28: clipped
        logp[1, 0] = old[1, 0] - 2.0  # ratio e^-2: the lower bound of 0 leaves it alone
    loss, stats = cispo_policy_loss(logp, old, adv, mask, clip_eps_low=1.0, clip_eps_high=0.28)
    (grad,) = torch.autograd.grad(loss, logp)

    N = int(mask.sum())
    expected_loss, expected_grad, clipped = 0.0, torch.zeros_like(old), 0
    for i, t in mask.nonzero().tolist():
        r = math.exp(float(logp[i, t].detach() - old[i, t]))
        w = min(max(r, 0.0), 1.28)
        clipped += w != r
        expected_loss += -w * float(adv[i, t]) * float(logp[i, t].detach()) / N
        expected_grad[i, t] = -w * float(adv[i, t]) / N
    assert float(loss) == pytest.approx(expected_loss, rel=1e-5)
    torch.testing.assert_close(grad, expected_grad)
    assert grad[0, 0] != 0 and float(adv[0, 0]) != 0
    assert float(stats["clipfrac"]) == pytest.approx(clipped / N) and clipped >= 1


@pytest.mark.parametrize("loss_fn", [ppo_policy_loss, gspo_policy_loss, cispo_policy_loss])
def test_weights_multiply_each_tokens_loss(loss_fn):
    """weights w scale token t's contribution: the gradient of the weighted loss is w times the
    unweighted gradient, token by token (the aggregation is linear in the per-token losses)."""
    logp, old, adv, mask = _batch(2)
    w = torch.rand(old.shape, generator=torch.Generator().manual_seed(5)) * 2
    (g1,) = torch.autograd.grad(loss_fn(logp, old, adv, mask, agg="token-mean")[0], logp)
    (gw,) = torch.autograd.grad(loss_fn(logp, old, adv, mask, agg="token-mean", weights=w)[0], logp)
    torch.testing.assert_close(gw, g1 * w * mask)


# ---------------------------------------------------------------- rollout correction


def test_rollout_correction_by_hand():
    """old - rollout log-ratios [ln 3, ln 0.5, 0] on row 0 (rho 3, 0.5, 1), [ln 1.5, pad] on row 1.
    cap 2. Token TIS: min(rho, 2) = [2, 0.5, 1], [1.5]. Token MIS: [0, 0.5, 1], [1.5].
    Sequence rhos: 3 * 0.5 * 1 = 1.5 and 1.5: both <= 2, so TIS and MIS give 1.5 everywhere."""
    old = torch.tensor([[math.log(3.0), math.log(0.5), 0.0], [math.log(1.5), 5.0, 5.0]])  # 5.0: padding
    rollout = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    w, stats = rollout_correction(old, rollout, mask, mode="tis", level="token", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 1.0], [1.5, 0, 0]]))
    assert float(stats["corrected_frac"]) == pytest.approx(1 / 4)
    assert float(stats["ratio_max"]) == pytest.approx(3.0)
    w, _ = rollout_correction(old, rollout, mask, mode="mis", level="token", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 1.0], [1.5, 0, 0]]))
    for mode in ("tis", "mis"):
        w, _ = rollout_correction(old, rollout, mask, mode=mode, level="sequence", cap=2.0)
        torch.testing.assert_close(w, torch.tensor([[1.5, 1.5, 1.5], [1.5, 0, 0]]))
    w, _ = rollout_correction(old, rollout, mask, mode="mis", level="sequence", cap=1.2)
    torch.testing.assert_close(w, torch.zeros(2, 3))  # both sequences rejected whole
    w, _ = rollout_correction(old, rollout, mask, mode="tis", level="sequence", cap=1.2)
    torch.testing.assert_close(w, torch.tensor([[1.2, 1.2, 1.2], [1.2, 0, 0]]))


def test_rollout_mismatch_statistics():
    """abs_logp_diff is the token mean of |old - rollout|; kl is the k3 estimate of KL(mu || pi):
    mean(rho - 1 - log rho). An exact engine gives 0, 0 and weights of 1 in every mode."""
    old = torch.tensor([[0.2, -0.1, 0.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    _, stats = rollout_correction(old, torch.zeros(1, 3), mask, mode="none")
    assert float(stats["abs_logp_diff"]) == pytest.approx(0.15)
    expected_kl = ((math.exp(0.2) - 1 - 0.2) + (math.exp(-0.1) - 1 + 0.1)) / 2
    assert float(stats["kl"]) == pytest.approx(expected_kl)
    for mode in ("none", "tis", "mis"):
        for level in ("token", "sequence"):
            w, s = rollout_correction(old, old.clone(), mask, mode=mode, level=level)
            torch.testing.assert_close(w, mask.float())
            assert float(s["abs_logp_diff"]) == 0 and float(s["kl"]) == 0


def test_rollout_correction_rejects_bad_options():
    x, m = torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="tis"):
        rollout_correction(x, x, m, mode="clip")
    with pytest.raises(ValueError, match="sequence"):
        rollout_correction(x, x, m, level="geo")
    with pytest.raises(ValueError, match="cap"):
        rollout_correction(x, x, m, cap=0)
