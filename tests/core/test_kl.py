"""KL estimators k1, abs, k2, k3."""

import math

import pytest
import torch

from align.core import KL_KINDS, kl_penalty

LN2 = math.log(2.0)


@pytest.mark.parametrize(
    "kind, at_plus, at_minus",
    [
        # r = +ln 2 | r = -ln 2
        ("k1", LN2, -LN2),
        ("abs", LN2, LN2),
        # r^2 / 2 = 0.480453 / 2
        ("k2", 0.5 * LN2**2, 0.5 * LN2**2),
        # exp(-r) - 1 + r: 0.5 - 1 + 0.693147 = 0.193147 | 2 - 1 - 0.693147 = 0.306853
        ("k3", 0.5 - 1 + LN2, 2 - 1 - LN2),
    ],
)
def test_estimators_by_hand(kind, at_plus, at_minus):
    """logp - ref_logp = +-ln 2 (the policy gives the token twice / half the reference's mass)."""
    logp = torch.tensor([[math.log(0.5), math.log(0.25)]])
    ref_logp = torch.tensor([[math.log(0.25), math.log(0.5)]])
    out = kl_penalty(logp, ref_logp, kind)
    torch.testing.assert_close(out, torch.tensor([[at_plus, at_minus]]))


def test_k1_and_k3_are_unbiased_k2_is_not():
    """Exact expectation under p (no sampling): sum_x p(x) k(log p(x) - log q(x)).
    k1 gives KL(p||q) by definition; k3 gives sum p (q/p - 1 + log p/q) = 1 - 1 + KL. k2 differs."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)
    kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        assert (p * kl_penalty(p.log(), q.log(), kind)).sum().item() == pytest.approx(kl.item(), rel=1e-12)
    assert (p * kl_penalty(p.log(), q.log(), "k2")).sum().item() != pytest.approx(kl.item(), rel=1e-3)


def test_nonnegative_kinds_are_nonnegative():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    for kind in ("abs", "k2", "k3"):
        assert (kl_penalty(logp, ref, kind) >= 0).all()


def test_clamp_bounds_the_estimate():
    logp = torch.tensor([5.0, -5.0, 0.1])
    out = kl_penalty(logp, torch.zeros(3), "k1", clamp=1.0)
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, 0.1]))


@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("clamp", [None, 10.0])
def test_extreme_log_ratios_stay_finite_with_finite_gradients(kind, clamp):
    """k3 at r = -1e4 would need exp(1e4) = inf; the guard keeps value and gradient finite."""
    logp = torch.tensor([1e4, -1e4, 0.0, 80.0, -80.0], requires_grad=True)
    out = kl_penalty(logp, torch.zeros(5), kind, clamp=clamp)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(logp.grad).all()


def test_k3_gradient_pulls_the_policy_toward_the_reference():
    """d k3 / d logp = 1 - exp(-r): +0.5 at r = ln 2 (push logp down), -1 at r = -ln 2."""
    logp = torch.tensor([LN2, -LN2], requires_grad=True)
    kl_penalty(logp, torch.zeros(2), "k3").sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.5, -1.0]))


def test_unknown_kind_lists_valid_kinds():
    with pytest.raises(ValueError, match="k1, abs, k2, k3"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
