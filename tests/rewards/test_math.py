"""Math reward: extraction, each normalisation, tolerance, symbolic equivalence, and GSM8K."""

from __future__ import annotations

import json

import pytest

from rewards import get_reward
from rewards.math import (
    _sympy_equal,
    answers_match,
    extract_answer,
    extract_answer_is,
    extract_boxed,
    extract_gsm8k,
    extract_last_number,
    normalize_answer,
    to_number,
)

try:
    import sympy  # noqa: F401

    HAVE_SYMPY = True
except ImportError:
    HAVE_SYMPY = False
needs_sympy = pytest.mark.skipif(not HAVE_SYMPY, reason="sympy (the optional 'math' extra) is not installed")


def load_gsm8k(shared_data):
    rows = []
    for split in ("train", "test"):
        with open(shared_data / "gsm8k" / f"{split}.jsonl") as f:
            rows += [json.loads(line) for line in f]
    return rows


def final_answer(solution: str) -> str:
    return solution.split("####")[-1].strip()


# ---- GSM8K: every shipped reference solution --------------------------------------------------


def test_every_gsm8k_solution_scores_1_on_its_own_answer_and_0_on_another(shared_data):
    rows = load_gsm8k(shared_data)
    assert len(rows) == 7473 + 1319
    solutions = [r["answer"] for r in rows]
    answers = [final_answer(s) for s in solutions]
    reward = get_reward("math")
    prompts = [r["question"] for r in rows]

    own = reward(prompts, solutions, ground_truth=answers)
    failures = [(i, answers[i]) for i, s in enumerate(own) if s != 1.0]
    assert not failures, failures[:10]

    # Pair each solution with the next question's answer; keep pairs whose answers differ as
    # numbers (consecutive questions sometimes share an answer).
    other = answers[1:] + answers[:1]
    differ = [i for i in range(len(rows)) if float(answers[i].replace(",", "")) != float(other[i].replace(",", ""))]
    assert len(differ) > 8500
    scores = reward([prompts[i] for i in differ], [solutions[i] for i in differ], ground_truth=[other[i] for i in differ])
    wrong = [(differ[k], other[differ[k]]) for k, s in enumerate(scores) if s != 0.0]
    assert not wrong, wrong[:10]


@pytest.mark.parametrize("ending", ["The answer is {}.", "So the final answer is ${}$.", "Therefore \\boxed{{{}}}"])
def test_every_gsm8k_solution_scores_1_in_other_answer_formats(shared_data, ending):
    """The reasoning without its `####` line, then the answer in another format (with a decoy
    number from the reasoning nowhere near the end)."""
    rows = load_gsm8k(shared_data)
    answers = [final_answer(r["answer"]) for r in rows]
    responses = [r["answer"].split("####")[0] + ending.format(a) for r, a in zip(rows, answers)]
    scores = get_reward("math")([""] * len(rows), responses, ground_truth=answers)
    assert scores == [1.0] * len(rows)


# ---- extraction -------------------------------------------------------------------------------


def test_extractors():
    assert extract_boxed(r"so $\boxed{\frac{1}{2}}$ and done") == r"\frac{1}{2}"
    assert extract_boxed(r"\boxed{1} then \boxed{{2}+\sqrt{3}}") == r"{2}+\sqrt{3}"  # last, nested
    assert extract_boxed(r"\fbox{4}") == "4"
    assert extract_boxed(r"$\boxed 5$") == "5"
    assert extract_boxed(r"\boxed{unclosed") is None
    assert extract_gsm8k("work\n#### 1,200\n") == "1,200"
    assert extract_answer_is("Hence, the answer is 3.5 cups. Next question") == "3.5 cups"
    assert extract_answer_is("Final answer: $\\frac{1}{2}$.") == "$\\frac{1}{2}$"
    assert extract_last_number("3 boxes of 1,250 and -2.5 then 3/4 left") == "3/4"
    assert extract_last_number("no digits") is None


def test_extraction_order_and_choice():
    text = "I got 5 first. The answer is 6. #### 7 and \\boxed{8} 9"
    assert extract_answer(text) == "8"
    assert extract_answer(text, ("gsm8k", "boxed")) == "7 and \\boxed{8} 9"
    assert extract_answer("The answer is 6, I think 7", ("answer_is", "last_number")) == "6, I think 7"
    assert extract_answer("no answer here", ("boxed", "gsm8k")) is None


def test_strict_extractors_ignore_a_stray_number():
    reward = get_reward("math", extractors=["boxed", "gsm8k"])
    assert reward(["q"], ["it is 72"], ground_truth=["72"]) == [0.0]
    assert get_reward("math")(["q"], ["it is 72"], ground_truth=["72"]) == [1.0]


# ---- normalisation, one case per rule -------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normalized",
    [
        (r"\dfrac{3}{4}", r"\frac{3}{4}"),
        (r"\tfrac{3}{4}", r"\frac{3}{4}"),
        (r"\frac12", r"\frac{1}{2}"),
        (r"\frac1{2}", r"\frac{1}{2}"),
        (r"\frac{1}2", r"\frac{1}{2}"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\left( 1, 2 \right)", "(1,2)"),
        (r"30^\circ", "30"),
        (r"30^{\circ}", "30"),
        ("30°", "30"),
        (r"50\%", "50"),
        ("50%", "50"),
        (r"\$18", "18"),
        ("$18$", "18"),
        ("1,234,567", "1234567"),
        ("1{,}000", "1000"),
        ("72.0", "72"),
        ("2.50", "2.5"),
        (".5", "0.5"),
        ("72 dollars", "72"),
        ("about 3 hours", "3"),
        (r"5\text{ cm}", "5"),
        (r"10 \mbox{ meters}", "10"),
        (r"5\text{ cm}^2", "5"),
        ("5 cm^2", "5"),
        (r"\frac{1}{2}\text{ cups}", r"\frac{1}{2}"),
        (r"\text{Monday}", "Monday"),  # a text answer is unwrapped, not dropped
        ("x = 5", "5"),
        (r"\(7\)", "7"),
        ("\u22123", "-3"),
        (r"3\,000", "3000"),
        ("(1,234)", "(1,234)"),  # in a tuple a comma separates elements
    ],
)
def test_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize(
    "prediction, reference",
    [
        (r"\frac{1}{2}", "0.5"),
        (r"\dfrac{1}{4}", "1/4"),
        (r"-\frac{3}{2}", "-1.5"),
        (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt3}{2}"),
        (r"\sqrt{16}", "4"),
        (r"2\sqrt{3}", r"\sqrt{12}"),  # numbers, no sympy needed
        (r"\sqrt[3]{27}", "3"),
        (r"2^{10}", "1024"),
        (r"3 \times 4", "12"),
        (r"\pi", "3.14159265358979"),
        (r"\left( 1, \frac{1}{2} \right)", "(1,0.5)"),
        ("$1,000.00", "1000"),
        ("72 dollars", "72"),
        (r"45^\circ", "45"),
    ],
)
def test_equivalent_answers_match(prediction, reference):
    assert answers_match(prediction, reference)


@pytest.mark.parametrize(
    "prediction, reference",
    [
        ("100001", "100000"),  # large integers are not "close enough"
        ("(1,2]", "(1,2)"),  # open and half-open intervals differ
        ("(1,2)", "(2,1)"),
        ("3x", "3"),  # a variable is not a unit
        (r"\frac{1}{3}", "0.33"),
        ("", "0"),
    ],
)
def test_different_answers_do_not_match(prediction, reference):
    assert not answers_match(prediction, reference)


def test_numeric_tolerance_is_configurable():
    assert not answers_match("0.333", r"\frac{1}{3}")
    assert answers_match("0.333", r"\frac{1}{3}", rel_tol=1e-2)
    reward = get_reward("math", rel_tol=1e-2)
    assert reward(["q"], ["\\boxed{3.14}"], ground_truth=["\\pi"]) == [1.0]


def test_hostile_answers_stay_cheap():
    nested = "\\frac{" * 2000 + "1" + "}" * 2000
    assert to_number(nested) is None
    assert not answers_match(nested, "1")
    assert get_reward("math")(["q"], ["the answer is " + "9" * 50_000], ground_truth=["9"]) == [0.0]


def test_to_number_rejects_non_arithmetic():
    assert to_number("x+1") is None
    assert to_number("__import__('os')") is None
    assert to_number("9**9**9") is None  # powers are bounded, not computed
    assert to_number(r"\frac{1}{0}") is None


# ---- symbolic equivalence (sympy, optional) ----------------------------------------------------


@needs_sympy
@pytest.mark.parametrize(
    "prediction, reference",
    [("x^2+2x+1", "(x+1)^2"), (r"\frac{x}{2}", "0.5x"), (r"\frac{a+b}{2}", "a/2+b/2"), (r"\frac{x^2-1}{x-1}", "x+1")],
)
def test_symbolic_equivalence(prediction, reference):
    assert answers_match(prediction, reference)


@needs_sympy
def test_symbolic_difference_and_unsafe_text_are_not_equal():
    assert not answers_match("x^2+1", "(x+1)^2")
    assert not answers_match(r"\sqrt{8x^2}", r"2\sqrt{2}x")  # equal only for x >= 0
    assert not _sympy_equal("__import__('os').getcwd()", "0")
    assert not _sympy_equal("x.real", "x")


def test_symbolic_can_be_switched_off():
    assert not answers_match("x^2+2x+1", "(x+1)^2", symbolic=False)


# ---- the reward -------------------------------------------------------------------------------


def test_math_reward_scores():
    reward = get_reward("math")
    responses = ["The answer is 72.", "\\boxed{71}", "no idea", "#### 1,000"]
    assert reward(["q"] * 4, responses, ground_truth=["72", "72", "72", "1000"]) == [1.0, 0.0, 0.0, 1.0]


def test_format_score_for_a_wrong_but_extracted_answer():
    reward = get_reward("math", format_score=0.1, extractors=["boxed"])
    assert reward(["q"] * 3, ["\\boxed{5}", "\\boxed{4}", "5"], ground_truth=["5"] * 3) == [1.0, 0.1, 0.0]


def test_ground_truth_may_be_a_whole_solution():
    reward = get_reward("math")
    assert reward(["q"], ["so 72"], ground_truth=["48/2 = 24\n#### 72"]) == [1.0]


def test_ground_truth_is_required_and_aligned():
    reward = get_reward("math")
    with pytest.raises(ValueError, match="ground_truth"):
        reward(["q"], ["72"])
    with pytest.raises(ValueError, match="ground_truth"):
        reward(["q", "q"], ["72", "72"], ground_truth=["72"])
    with pytest.raises(ValueError, match="ground_truth"):
        reward(["q"], ["72"], ground_truth="72")
    with pytest.raises(ValueError, match="unknown extractors"):
        get_reward("math", extractors=["magic"])
