"""Offline preference losses (the DPO family, KTO, ORPO) and the Bradley-Terry reward-model loss.

Input contract (what the DPO trainer computes and passes)
---------------------------------------------------------
Pairwise losses, registered in `PREFERENCE_LOSSES` as sigmoid, robust, ipo, hinge, simpo, orpo,
all share one signature so the trainer calls any of them the same way:

    loss_fn = PREFERENCE_LOSSES.get(cfg.loss_type)
    loss, stats = loss_fn(policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps,
                          chosen_lengths, rejected_lengths,
                          beta=cfg.beta, **cfg.loss_kwargs)

- policy_{chosen,rejected}_logps: (B,) log pi(y|x) summed over the *response* tokens (prompt
  and padding excluded), with grad. `sequence_logps(token_logps, mask)` computes them.
- ref_{chosen,rejected}_logps: (B,) the same sums under the reference model, no grad.
  Required by sigmoid, robust, ipo; optional for hinge (None = SLiC's reference-free hinge);
  ignored by simpo and orpo (`REFERENCE_FREE_LOSSES`: skip the reference forward pass).
- {chosen,rejected}_lengths: (B,) number of response tokens. Required by simpo and orpo (they
  use the average log-prob, logps / lengths); ignored by the others.
- beta: the loss's temperature (for orpo: the weight lambda of the odds-ratio term).
- loss-specific keywords: label_smoothing (sigmoid, robust), gamma (simpo).

KTO is unpaired and takes its own inputs (registered as "kto", called differently):

    loss, stats = kto_loss(policy_logps, ref_logps, desirable, kl_ref, beta=...,
                           desirable_weight=..., undesirable_weight=...)

- policy_logps, ref_logps: (B,) summed response log-probs of each example;
- desirable: (B,) bool label;
- kl_ref: scalar reference point z0 = `kto_reference_point(policy_kl_logps, ref_kl_logps)` on
  mismatched (x, y') pairs; all-reduce it (mean) across data-parallel ranks before passing.

Every loss returns (loss scalar, stats) where stats are detached 0-dim tensors: chosen_rewards,
rejected_rewards (mean implicit rewards), margins (mean chosen - rejected reward) and accuracy
(fraction of pairs with chosen reward > rejected reward), plus loss-specific extras.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from align.core.masked import masked_mean, masked_sum
from align.core.registry import Registry

PREFERENCE_LOSSES = Registry("preference loss")
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo"})


def sequence_logps(token_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed response log-prob and response length per sequence.

    Args:
        token_logps: (B, T) per-token log-probs (see `logprobs_from_logits`).
        mask: (B, T) response mask (prompt and padding False).

    Returns:
        logps: (B,) sum over response tokens. lengths: (B,) number of response tokens.
    """
    return masked_sum(token_logps, mask, dim=-1), mask.bool().sum(-1).to(token_logps.dtype)


def _pair_stats(chosen_rewards: Tensor, rejected_rewards: Tensor, **extra: Tensor) -> dict[str, Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    stats = {
        "chosen_rewards": chosen_rewards.mean(),
        "rejected_rewards": rejected_rewards.mean(),
        "margins": (chosen_rewards - rejected_rewards).mean(),
        "accuracy": (chosen_rewards > rejected_rewards).float().mean(),
    }
    stats.update({k: v.detach() for k, v in extra.items()})
    return stats


def _require(name: str, **tensors: Tensor | None) -> None:
    missing = [k for k, v in tensors.items() if v is None]
    if missing:
        raise ValueError(f"preference loss {name!r} needs {', '.join(missing)}")


def _dpo_logits(pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor) -> Tensor:
    """h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l), (B,)."""
    return (pc - rc) - (pr - rr)


@PREFERENCE_LOSSES.register("sigmoid")
def dpo_sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO: -log sigmoid(beta * h), with cDPO label smoothing eps:
    (1 - eps) * -log sigmoid(beta * h) + eps * -log sigmoid(-beta * h).

    Rafailov et al. 2023 (https://arxiv.org/abs/2305.18290), Eq. 7; conservative DPO: Mitchell
    2023, "A note on DPO with noisy preferences" (https://ericmitchell.ai/cdpo.pdf), Eq. 3.
    h = log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l); implicit reward beta * log pi/pi_ref.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs, policy.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the reference (required).
        chosen_lengths, rejected_lengths: unused.
        beta: temperature.
        label_smoothing: eps in [0, 0.5], the assumed probability that a label is flipped.
    """
    _require("sigmoid", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return losses.mean(), _pair_stats(chosen, rejected)


@PREFERENCE_LOSSES.register("robust")
def robust_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Robust DPO (rDPO), unbiased under label-flip rate eps:
    [(1 - eps) * -log sigmoid(beta * h) - eps * -log sigmoid(-beta * h)] / (1 - 2 eps).

    Chowdhury et al. 2024, "Provably Robust DPO" (https://arxiv.org/abs/2403.00409), the
    de-biased loss of Sec. 3. Unlike cDPO the flipped term is *subtracted*, so the loss can be
    negative. Same inputs and implicit rewards as `dpo_sigmoid_loss`.

    Args:
        label_smoothing: eps in [0, 0.5).
    """
    _require("robust", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5) for robust DPO, got {label_smoothing}")
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return losses.mean(), _pair_stats(chosen, rejected)


@PREFERENCE_LOSSES.register("ipo")
def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """IPO: (h - 1 / (2 beta))^2, a squared loss that regresses h to a finite target.

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (https://arxiv.org/abs/2310.12036), Eq. 17. Here beta is the paper's tau.
    h is built from summed log-probs as in the paper; pass per-token averages instead if a
    length-normalised IPO is wanted. Same inputs and implicit rewards as `dpo_sigmoid_loss`.
    """
    _require("ipo", ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (h - 1 / (2 * beta)).square()
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return losses.mean(), _pair_stats(chosen, rejected)


@PREFERENCE_LOSSES.register("hinge")
def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Hinge: max(0, 1 - beta * h).

    Without a reference, h = log pi(y_w) - log pi(y_l): the rank calibration loss of SLiC-HF
    (Zhao et al. 2023, https://arxiv.org/abs/2305.10425) with margin 1/beta. With a reference,
    h is DPO's log-ratio difference: the "hinge" loss of RSO (Liu et al. 2023,
    https://arxiv.org/abs/2309.06657). Implicit rewards are beta * log pi/pi_ref, or
    beta * log pi without a reference.
    """
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("hinge: pass both reference log-probs or neither")
    ref_c = torch.zeros_like(policy_chosen_logps) if ref_chosen_logps is None else ref_chosen_logps
    ref_r = torch.zeros_like(policy_rejected_logps) if ref_rejected_logps is None else ref_rejected_logps
    h = _dpo_logits(policy_chosen_logps, policy_rejected_logps, ref_c, ref_r)
    losses = torch.relu(1 - beta * h)
    return losses.mean(), _pair_stats(beta * (policy_chosen_logps - ref_c), beta * (policy_rejected_logps - ref_r))


@PREFERENCE_LOSSES.register("simpo")
def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO: -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma).

    Meng et al. 2024 (https://arxiv.org/abs/2405.14734), Eq. 6. Reference-free; the implicit
    reward is the length-normalised beta * log pi(y) / |y|; gamma is the target reward margin.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs, policy.
        ref_chosen_logps, ref_rejected_logps: ignored.
        chosen_lengths, rejected_lengths: (B,) response lengths in tokens (required).
        beta: reward scale (the paper uses 2 - 10).
        gamma: target margin.
    """
    _require("simpo", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    chosen = beta * policy_chosen_logps / chosen_lengths.clamp_min(1)
    rejected = beta * policy_rejected_logps / rejected_lengths.clamp_min(1)
    losses = -F.logsigmoid(chosen - rejected - gamma)
    return losses.mean(), _pair_stats(chosen, rejected)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012, "Accurately Computing
    log(1 - exp(-|a|))")."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@PREFERENCE_LOSSES.register("orpo")
def orpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO: NLL(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)).

    Hong et al. 2024 (https://arxiv.org/abs/2403.07691), Eq. 6 (L_SFT + lambda * L_OR) and
    Eq. 7 (L_OR), with odds(y) = P(y) / (1 - P(y)) and log P(y) the *average* per-token
    log-prob, so log odds = a - log(1 - exp(a)). Reference-free. `beta` is the paper's lambda.
    The NLL is the token-mean over all chosen response tokens of the batch (the usual causal-LM
    loss on y_w). a is capped just below 0 (at -machine eps) so a sequence predicted with
    probability 1 gives a large but finite log-odds. Implicit rewards are beta * a.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed response log-probs, policy.
        ref_chosen_logps, ref_rejected_logps: ignored.
        chosen_lengths, rejected_lengths: (B,) response lengths in tokens (required).
        beta: lambda, the weight of the odds-ratio term.

    Extra stats: nll, log_odds_ratio (mean).
    """
    _require("orpo", chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    avg_chosen = policy_chosen_logps / chosen_lengths.clamp_min(1)  # (B,)
    avg_rejected = policy_rejected_logps / rejected_lengths.clamp_min(1)
    cap = -torch.finfo(avg_chosen.dtype).eps
    a_w, a_l = avg_chosen.clamp(max=cap), avg_rejected.clamp(max=cap)
    log_odds_ratio = (a_w - _log1mexp(a_w)) - (a_l - _log1mexp(a_l))  # (B,)
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp_min(1)
    loss = nll + beta * -F.logsigmoid(log_odds_ratio).mean()
    return loss, _pair_stats(beta * avg_chosen, beta * avg_rejected, nll=nll, log_odds_ratio=log_odds_ratio.mean())


def kto_reference_point(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean(log pi(y'|x) - log pi_ref(y'|x))), detached.

    Estimated on mismatched pairs (x, y') (a completion of another prompt in the batch), as in
    Ethayarajh et al. 2024 (https://arxiv.org/abs/2402.01306), Sec. 4. No gradient flows
    through z0. Average it across data-parallel ranks before use.

    Args:
        policy_kl_logps, ref_kl_logps: (M,) summed log-probs of the mismatched completions.
    """
    return (policy_kl_logps - ref_kl_logps).mean().clamp_min(0).detach()


@PREFERENCE_LOSSES.register("kto")
def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_ref: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO: mean over examples of lambda_y - v(x, y), with r = log pi(y|x)/pi_ref(y|x) and
    v = lambda_D sigmoid(beta (r - z0)) for desirable y, lambda_U sigmoid(beta (z0 - r)) otherwise.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (https://arxiv.org/abs/2402.01306), Sec. 4 (the KTO loss L_KTO). Per example that is
    lambda_D (1 - sigmoid(beta (r - z0))) or lambda_U (1 - sigmoid(beta (z0 - r))).

    Args:
        policy_logps: (B,) summed response log-probs under the policy.
        ref_logps: (B,) the same under the reference.
        desirable: (B,) bool, True for a desirable (thumbs-up) completion.
        kl_ref: scalar z0 (see `kto_reference_point`); detached here.
        beta: temperature.
        desirable_weight, undesirable_weight: lambda_D and lambda_U (the paper suggests
            lambda_D n_D / (lambda_U n_U) in [1, 4/3] when the classes are unbalanced).

    Returns:
        loss: scalar. stats: chosen_rewards / rejected_rewards (mean beta * r over desirable /
        undesirable examples, 0 if none), margins (their difference), accuracy (fraction of
        examples on the right side of z0), kl (z0).
    """
    desirable = desirable.bool()
    z0 = torch.as_tensor(kl_ref, dtype=policy_logps.dtype, device=policy_logps.device).detach()
    r = policy_logps - ref_logps  # (B,)
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (r - z0)),  # 1 - sigmoid(x) = sigmoid(-x)
        undesirable_weight * torch.sigmoid(-beta * (z0 - r)),
    )
    with torch.no_grad():
        rewards = beta * r
        chosen, rejected = masked_mean(rewards, desirable), masked_mean(rewards, ~desirable)
        stats = {
            "chosen_rewards": chosen,
            "rejected_rewards": rejected,
            "margins": chosen - rejected,
            "accuracy": ((r > z0) == desirable).float().mean(),
            "kl": z0,
        }
    return losses.mean(), {k: v.detach() for k, v in stats.items()}


def bradley_terry_loss(
    chosen_scores: Tensor, rejected_scores: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-model loss: -log sigmoid(s_w - s_l - m), mean over pairs.

    Bradley-Terry pairwise loss of InstructGPT (Ouyang et al. 2022,
    https://arxiv.org/abs/2203.02155, Eq. 1); the optional margin m (e.g. from graded
    preference strength) is Llama 2's (Touvron et al. 2023, https://arxiv.org/abs/2307.09288,
    Eq. 2).

    Args:
        chosen_scores: (B,) reward-model scores of the chosen responses, with grad.
        rejected_scores: (B,) scores of the rejected responses.
        margin: (B,) or scalar margin, or None for 0.

    Returns:
        loss: scalar. stats: chosen_rewards, rejected_rewards, margins (mean s_w - s_l),
        accuracy (fraction with s_w > s_l).
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean(), _pair_stats(chosen_scores, rejected_scores)
