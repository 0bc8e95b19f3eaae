"""Preference losses: hand-derived values, gradient direction, edge cases."""

import math

import pytest
import torch

from align.core import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    bradley_terry_loss,
    kto_loss,
    kto_reference_point,
    logprobs_from_logits,
    sequence_logps,
)


def softplus(x):
    return math.log1p(math.exp(x))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# policy chosen / rejected, reference chosen / rejected: h = (-1 + 1.5) - (-2 + 1.5) = 1.
PAIR = dict(
    policy_chosen_logps=t(-1.0),
    policy_rejected_logps=t(-2.0),
    ref_chosen_logps=t(-1.5),
    ref_rejected_logps=t(-1.5),
)


def test_dpo_sigmoid_by_hand():
    """beta 0.1, h = 1: -log sigmoid(0.1) = log(1 + e^-0.1) = 0.644397. Implicit rewards
    0.1 * 0.5 = 0.05 and 0.1 * -0.5 = -0.05, margin 0.1, accuracy 1."""
    loss, stats = PREFERENCE_LOSSES.get("sigmoid")(**PAIR, beta=0.1)
    assert loss.item() == pytest.approx(softplus(-0.1))
    assert loss.item() == pytest.approx(0.644397, abs=1e-6)
    assert stats["chosen_rewards"].item() == pytest.approx(0.05)
    assert stats["rejected_rewards"].item() == pytest.approx(-0.05)
    assert stats["margins"].item() == pytest.approx(0.1)
    assert stats["accuracy"].item() == 1.0


def test_cdpo_label_smoothing_by_hand():
    """eps 0.1: 0.9 * 0.644397 + 0.1 * -log sigmoid(-0.1) = 0.9 * 0.644397 + 0.1 * 0.744397
    = 0.654397."""
    loss, _ = PREFERENCE_LOSSES.get("sigmoid")(**PAIR, beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.654397, abs=1e-6)


def test_robust_dpo_by_hand():
    """eps 0.1: (0.9 * 0.644397 - 0.1 * 0.744397) / (1 - 0.2) = 0.505518 / 0.8 = 0.631897;
    at eps 0 it is plain DPO."""
    robust = PREFERENCE_LOSSES.get("robust")
    assert robust(**PAIR, beta=0.1, label_smoothing=0.1)[0].item() == pytest.approx(0.631897, abs=1e-6)
    assert robust(**PAIR, beta=0.1)[0].item() == pytest.approx(0.644397, abs=1e-6)
    with pytest.raises(ValueError, match="label_smoothing"):
        robust(**PAIR, label_smoothing=0.5)


def test_ipo_by_hand():
    """(h - 1 / (2 beta))^2 = (1 - 5)^2 = 16 at beta 0.1."""
    assert PREFERENCE_LOSSES.get("ipo")(**PAIR, beta=0.1)[0].item() == pytest.approx(16.0)


def test_hinge_by_hand_with_and_without_reference():
    """With reference: h = 1, relu(1 - 0.1 * 1) = 0.9. Reference-free (SLiC): h = -1 - (-3) = 2,
    relu(1 - 0.5 * 2) = 0, and at h = 1: 1 - 0.5 = 0.5."""
    hinge = PREFERENCE_LOSSES.get("hinge")
    assert hinge(**PAIR, beta=0.1)[0].item() == pytest.approx(0.9)
    assert hinge(t(-1.0), t(-3.0), beta=0.5)[0].item() == pytest.approx(0.0)
    loss, stats = hinge(t(-1.0), t(-2.0), beta=0.5)
    assert loss.item() == pytest.approx(0.5)
    assert stats["chosen_rewards"].item() == pytest.approx(-0.5)  # beta * log pi without reference


def test_simpo_by_hand():
    """Chosen -6 over 3 tokens (avg -2), rejected -12 over 4 (avg -3); beta 2, gamma 0.5:
    rewards -4 and -6, logits -4 + 6 - 0.5 = 1.5, loss log(1 + e^-1.5) = 0.201413."""
    loss, stats = PREFERENCE_LOSSES.get("simpo")(
        t(-6.0), t(-12.0), chosen_lengths=t(3.0), rejected_lengths=t(4.0), beta=2.0, gamma=0.5
    )
    assert loss.item() == pytest.approx(0.201413, abs=1e-6)
    assert stats["chosen_rewards"].item() == pytest.approx(-4.0)
    assert stats["margins"].item() == pytest.approx(2.0)


def test_orpo_by_hand():
    """Chosen: 2 tokens at p = 0.5 (avg log p = ln 0.5): odds 1, log odds 0. Rejected: avg
    log p = ln 0.2: odds 0.25, log odds -1.386294. L_OR = -log sigmoid(1.386294)
    = log(1 + 0.25) = 0.223144. NLL = -2 ln 0.5 / 2 = 0.693147. lambda 0.1: 0.715461."""
    loss, stats = PREFERENCE_LOSSES.get("orpo")(
        t(2 * math.log(0.5)), t(3 * math.log(0.2)), chosen_lengths=t(2.0), rejected_lengths=t(3.0), beta=0.1
    )
    assert loss.item() == pytest.approx(0.715461, abs=1e-6)
    assert stats["nll"].item() == pytest.approx(math.log(2.0))
    assert stats["log_odds_ratio"].item() == pytest.approx(math.log(4.0))


def test_kto_by_hand():
    """beta 0.1, z0 = 0.5. Desirable, r = 2.5: 1 - sigmoid(0.1 * 2) = 0.450166. Undesirable,
    r = -1.5: 1 - sigmoid(0.1 * (0.5 + 1.5)) = 0.450166, weight 2 -> 0.900332.
    Mean 0.675249. Rewards 0.25 and -0.15, margin 0.4, both on the right side of z0."""
    loss, stats = kto_loss(
        t(2.5, -1.5), t(0.0, 0.0), torch.tensor([True, False]), 0.5, beta=0.1, undesirable_weight=2.0
    )
    assert loss.item() == pytest.approx(0.675249, abs=1e-6)
    assert stats["chosen_rewards"].item() == pytest.approx(0.25)
    assert stats["rejected_rewards"].item() == pytest.approx(-0.15)
    assert stats["margins"].item() == pytest.approx(0.4)
    assert stats["accuracy"].item() == 1.0 and stats["kl"].item() == 0.5
    assert PREFERENCE_LOSSES.get("kto") is kto_loss


def test_kto_reference_point_is_clamped_and_detached():
    """mean(-1, -3) = -2 clamps to 0; mean(1, 3) = 2."""
    policy = t(1.0, 3.0).requires_grad_()
    assert kto_reference_point(-policy, t(0.0, 0.0)).item() == 0.0
    z0 = kto_reference_point(policy, t(0.0, 0.0))
    assert z0.item() == pytest.approx(2.0) and not z0.requires_grad


def test_kto_with_only_one_class_has_finite_stats():
    _, stats = kto_loss(t(1.0, 2.0), t(0.0, 0.0), torch.tensor([True, True]), 0.0)
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats["rejected_rewards"].item() == 0.0


def test_bradley_terry_by_hand():
    """s_w - s_l = 1: log(1 + e^-1) = 0.313262; margin 1: log 2 = 0.693147."""
    loss, stats = bradley_terry_loss(t(2.0), t(1.0))
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    assert stats["accuracy"].item() == 1.0 and stats["margins"].item() == pytest.approx(1.0)
    assert bradley_terry_loss(t(2.0), t(1.0), margin=t(1.0))[0].item() == pytest.approx(math.log(2.0))


def test_required_inputs_are_checked():
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        PREFERENCE_LOSSES.get("sigmoid")(t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="chosen_lengths"):
        PREFERENCE_LOSSES.get("simpo")(t(-1.0), t(-2.0))
    with pytest.raises(ValueError, match="label_smoothing"):
        PREFERENCE_LOSSES.get("sigmoid")(**PAIR, label_smoothing=0.7)
    with pytest.raises(TypeError):  # a misspelt hyperparameter is not silently ignored
        PREFERENCE_LOSSES.get("sigmoid")(**PAIR, label_smothing=0.1)


PAIRWISE = ["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"]


@pytest.mark.parametrize("name", PAIRWISE)
def test_one_step_raises_the_chosen_log_ratio_over_the_rejected(name):
    """A tiny model (a bias over the vocabulary per position) scores a chosen and a rejected
    response. One SGD step on the loss must increase
    [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)], with the reference fixed at
    the initial model (so the reference terms cancel in the change)."""
    torch.manual_seed(0)
    V, T = 6, 4
    logits = torch.randn(1, T, V, dtype=torch.float64, requires_grad=True)
    chosen, rejected = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[5, 4, 3, 2]])
    mask = torch.ones(1, T, dtype=torch.bool)

    def logps(tokens):
        return sequence_logps(logprobs_from_logits(logits, tokens), mask)

    with torch.no_grad():
        (ref_c, len_c), (ref_r, len_r) = logps(chosen), logps(rejected)
    # at the start h = 0: inside IPO's target 1/(2 beta) and hinge's margin 1/beta, so every loss
    # has a gradient; a small step keeps IPO's squared loss from overshooting its target
    kwargs = dict(beta=0.1)
    (pc, _), (pr, _) = logps(chosen), logps(rejected)
    loss, _ = PREFERENCE_LOSSES.get(name)(pc, pr, ref_c, ref_r, len_c, len_r, **kwargs)
    loss.backward()
    before = (pc - pr).item()
    with torch.no_grad():
        logits -= 0.01 * logits.grad
        (pc2, _), (pr2, _) = logps(chosen), logps(rejected)
    assert (pc2 - pr2).item() > before
    assert loss.item() > PREFERENCE_LOSSES.get(name)(pc2, pr2, ref_c, ref_r, len_c, len_r, **kwargs)[0].item()


def test_kto_step_raises_desirable_and_lowers_undesirable_log_ratio():
    policy = t(-3.0, -3.0).requires_grad_()
    ref = t(-3.0, -3.0)
    loss, _ = kto_loss(policy, ref, torch.tensor([True, False]), 0.0, beta=0.5)
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the desirable, lowers the other


@pytest.mark.parametrize("name", PAIRWISE)
@pytest.mark.parametrize("gap", [1e4, -1e4])
def test_extreme_log_ratios_give_finite_losses_and_gradients(name, gap):
    """Log-prob gaps of +-1e4 in fp32 (sigmoid would overflow a naive log(1 + exp(.)))."""
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0 - gap], requires_grad=True)
    ref = torch.tensor([-1.0])
    lengths = torch.tensor([1.0])
    loss, stats = PREFERENCE_LOSSES.get(name)(pc, pr, ref, ref, lengths, lengths, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    assert all(torch.isfinite(v) for v in stats.values())


def test_orpo_survives_probability_one():
    """Average log-prob exactly 0 (every token certain) would make log(1 - p) = -inf."""
    zero = torch.zeros(1, requires_grad=True)
    loss, _ = PREFERENCE_LOSSES.get("orpo")(zero, zero, None, None, torch.ones(1), torch.ones(1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zero.grad).all()


def test_bradley_terry_extreme_scores_are_finite():
    c = torch.tensor([-1e4, 1e4], requires_grad=True)
    loss, _ = bradley_terry_loss(c, torch.zeros(2))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all()


def test_reference_free_losses_ignore_the_reference():
    for name in REFERENCE_FREE_LOSSES:
        fn = PREFERENCE_LOSSES.get(name)
        args = (t(-4.0), t(-9.0))
        lengths = dict(chosen_lengths=t(2.0), rejected_lengths=t(3.0))
        torch.testing.assert_close(fn(*args, t(-1.0), t(-7.0), **lengths)[0], fn(*args, **lengths)[0])


def test_sequence_logps_sums_response_tokens():
    token_logps = torch.tensor([[-1.0, -2.0, -50.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    logps, lengths = sequence_logps(token_logps, mask)
    torch.testing.assert_close(logps, torch.tensor([-3.0, -1.5]))
    torch.testing.assert_close(lengths, torch.tensor([2.0, 3.0]))
