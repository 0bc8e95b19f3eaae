"""pass@k, maj@k and the pairwise report against brute-force enumeration and hand counts."""

from itertools import combinations

import pytest

from align.core.evaluation import length_baseline, maj_at_k, majority_vote, pairwise_report, pass_at_k, quantile


def brute_pass_at_k(correct: list[bool], k: int) -> float:
    """The definition: the fraction of the C(n, k) size-k subsets with at least one correct sample."""
    subsets = list(combinations(range(len(correct)), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_enumeration_over_subsets(n):
    for c in range(n + 1):
        correct = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(correct, k), abs=1e-12), (n, c, k)


def test_pass_at_k_hand_values_and_errors():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(5, 0, 5) == 0.0
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(2, 3, 1)


def test_majority_vote_ties_go_to_the_first_seen_answer():
    assert majority_vote(["7", "5", "5", "7"]) == 0  # 2-2 tie: "7" appeared first
    assert majority_vote(["5", "7", "7", "5"]) == 0
    assert majority_vote([None, "3", "4", "4"]) == 2  # "4" wins 2-1: its first sample
    assert majority_vote([None, None]) is None
    assert majority_vote(["1", None, None, None, "1"]) == 0  # None does not vote


def test_maj_at_k_votes_over_the_first_k_samples():
    answers = ["3", "4", "4", "3", "3"]
    correct = [True, False, False, True, True]
    assert maj_at_k(answers, correct, 1) == 1.0
    assert maj_at_k(answers, correct, 3) == 0.0  # "4" wins 2-1
    assert maj_at_k(answers, correct, 4) == 1.0  # 2-2 tie: "3" came first
    assert maj_at_k(answers, correct, 5) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(answers, correct, 6)


def test_length_baseline_and_quantile():
    assert length_baseline([5, 3, 4], [3, 5, 4]) == [1.0, 0.0, 0.5]
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == pytest.approx(2.5)
    assert quantile([1.0, 2.0], 0.1) == pytest.approx(1.1)


def test_pairwise_report_counts_by_hand():
    chosen = [2.0, 0.0, 1.0, 3.0]
    rejected = [1.0, 1.0, 1.0, 0.0]  # margins 1, -1, 0 (a tie is wrong), 3
    chosen_len = [10, 2, 6, 30]
    rejected_len = [4, 8, 6, 40]  # longer wins: 1, 0, 0.5, 0
    r = pairwise_report(chosen, rejected, chosen_len, rejected_len, num_buckets=2)
    assert r["accuracy"] == 0.5 and r["pairs"] == 4
    assert r["length_baseline"] == pytest.approx(1.5 / 4)
    assert r["margin"]["mean"] == pytest.approx(0.75)
    assert r["margin"]["median"] == pytest.approx(0.5)
    # mean lengths 7, 5, 6, 35 -> shortest two (pairs 1, 2) and the rest (pairs 0, 3)
    assert [b["pairs"] for b in r["by_length"]] == [2, 2]
    assert r["by_length"][0]["accuracy"] == 0.0 and r["by_length"][1]["accuracy"] == 1.0
    assert r["by_length"][0]["length_baseline"] == 0.25
    assert r["chosen_longer"] == {"pairs": 1, "accuracy": 1.0, "length_baseline": 1.0}
    assert r["chosen_shorter"]["pairs"] == 2 and r["chosen_shorter"]["accuracy"] == 0.5
    assert r["same_length"]["pairs"] == 1
