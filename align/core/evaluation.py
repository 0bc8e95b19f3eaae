"""Evaluation statistics as pure functions: pass@k, maj@k, pairwise reward-model accuracy.

Plain Python numbers in, plain numbers out (no torch, no config): the evaluation stage
(align/evaluation) and the RL drivers' held-out evaluation call these on what they measured.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from `n` samples of which `c` are correct.

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374,
    Eq. 1: pass@k = E[1 - C(n - c, k) / C(n, k)], the chance that at least one of k samples
    drawn without replacement from the n is correct, computed as the numerically stable
    product 1 - prod_{i=n-c+1}^{n} (1 - k / i) of the paper's Figure 3.

    n: samples of the problem (>= k); c: correct ones (0 <= c <= n); k: the budget (>= 1).
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence[Optional[Hashable]]) -> Optional[int]:
    """Index of the sample whose answer wins the vote, or None when no sample has an answer.

    answers: one extracted (normalised) answer per sample, None where none was extracted; None
    does not vote. The most frequent answer wins; a tie goes to the tied answer that appears
    first (deterministic, as `collections.Counter.most_common` orders ties, which is what
    lm-evaluation-harness's majority-vote filter uses). The winner's first sample is returned,
    so the caller reads that sample's correctness.
    """
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None
    winner, _ = votes.most_common(1)[0]  # insertion order breaks ties: first seen wins
    return next(i for i, a in enumerate(answers) if a == winner)


def maj_at_k(answers: Sequence[Optional[Hashable]], correct: Sequence[bool], k: int) -> float:
    """maj@k of one problem: 1.0 when the majority answer of its first `k` samples is correct.

    Wang et al. 2022 (self-consistency, arXiv:2203.11171) vote over sampled answers; like
    lm-evaluation-harness's `maj@k` filter the vote is over the first k samples (deterministic;
    no resampling). answers[i]: sample i's extracted answer (None: no answer, no vote);
    correct[i]: whether sample i is correct. No answer among the k: 0.0.
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers for {len(correct)} correctness flags")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: need 1 <= k <= n, got k={k}, n={len(answers)}")
    winner = majority_vote(answers[:k])
    return float(winner is not None and bool(correct[winner]))


def length_baseline(chosen_lengths: Sequence[float], rejected_lengths: Sequence[float]) -> list[float]:
    """Per pair, the "longer response wins" predictor's accuracy: 1 when the chosen response is
    longer, 0 when shorter, 0.5 on a tie (a coin flip), the baseline reward models must beat
    (Singhal et al. 2023, "A Long Way to Go", arXiv:2310.03716)."""
    if len(chosen_lengths) != len(rejected_lengths):
        raise ValueError(f"length_baseline: {len(chosen_lengths)} chosen lengths for {len(rejected_lengths)} rejected")
    return [1.0 if c > r else 0.0 if c < r else 0.5 for c, r in zip(chosen_lengths, rejected_lengths)]


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile of `values`, linearly interpolated between order statistics (numpy's
    default); nan for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pairwise_report(chosen: Sequence[float], rejected: Sequence[float], chosen_lengths: Sequence[float],
                    rejected_lengths: Sequence[float], num_buckets: int = 4) -> dict:
    """A reward model's pairwise accuracy, margin statistics, and accuracy by response length
    against the "longer response wins" baseline on the same pairs.

    chosen, rejected: (N,) scores of each pair's preferred and dispreferred response.
    chosen_lengths, rejected_lengths: (N,) their lengths (any unit; characters in align).
    Accuracy counts chosen > rejected (a tie is wrong, as in training's accuracy). Buckets:
    `num_buckets` equal-count groups of the pairs by mean response length (shortest first),
    plus the pairs where the chosen response is the longer, the shorter, or equally long.
    """
    n = len(chosen)
    if not n or not len(rejected) == len(chosen_lengths) == len(rejected_lengths) == n:
        raise ValueError("pairwise_report: need the same positive number of chosen, rejected and length values")
    margins = [c - r for c, r in zip(chosen, rejected)]
    hits = [float(m > 0) for m in margins]
    base = length_baseline(chosen_lengths, rejected_lengths)

    def group(idx: list[int]) -> dict:
        return {"pairs": len(idx), "accuracy": sum(hits[i] for i in idx) / len(idx) if idx else float("nan"),
                "length_baseline": sum(base[i] for i in idx) / len(idx) if idx else float("nan")}

    mean_len = [(c + r) / 2 for c, r in zip(chosen_lengths, rejected_lengths)]
    order = sorted(range(n), key=lambda i: (mean_len[i], i))
    buckets = []
    for b in range(min(num_buckets, n)):
        idx = order[b * n // min(num_buckets, n): (b + 1) * n // min(num_buckets, n)]
        buckets.append({"min_length": mean_len[idx[0]], "max_length": mean_len[idx[-1]], **group(idx)})
    mean = sum(margins) / n
    return {
        **group(list(range(n))),
        "margin": {"mean": mean, "std": math.sqrt(sum((m - mean) ** 2 for m in margins) / n),
                   "p10": quantile(margins, 0.1), "median": quantile(margins, 0.5), "p90": quantile(margins, 0.9)},
        "by_length": buckets,
        "chosen_longer": group([i for i in range(n) if chosen_lengths[i] > rejected_lengths[i]]),
        "chosen_shorter": group([i for i in range(n) if chosen_lengths[i] < rejected_lengths[i]]),
        "same_length": group([i for i in range(n) if chosen_lengths[i] == rejected_lengths[i]]),
    }
