"""The reward protocol, registry and weighted composition."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from rewards import REWARDS, CompositeReward, get_reward, register_reward, score_with_components


def constant(value):
    return lambda prompts, responses, **md: [value] * len(responses)


def length_of(prompts, responses, **md):
    return [float(len(r)) for r in responses]


@pytest.fixture
def scratch_name():
    name = "test-scratch-reward"
    yield name
    REWARDS.pop(name, None)


def test_builtin_rewards_are_registered():
    assert {"composite", "math", "format", "length", "story", "remote"} <= set(REWARDS)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(KeyError, match=r"unknown reward 'nope'.*'math'.*'story'"):
        get_reward("nope")


def test_register_and_build_with_options(scratch_name):
    @register_reward(scratch_name)
    def factory(value=1.0):
        return constant(value)

    assert get_reward(scratch_name, value=2.5)(["p", "q"], ["a", "b"]) == [2.5, 2.5]


def test_duplicate_name_is_refused(scratch_name):
    register_reward(scratch_name)(constant)
    with pytest.raises(ValueError, match="already registered"):
        register_reward(scratch_name)(constant)


def test_composite_is_the_weighted_sum_and_keeps_components():
    """responses "ab", "abcd": length 2, 4; constant 1.
    total = 0.5 * len + (-2) * 1 -> 0.5*2 - 2 = -1, 0.5*4 - 2 = 0."""
    reward = CompositeReward({"len": (length_of, 0.5), "one": (constant(1.0), -2.0)})
    scores, parts = reward.score_with_components(["p", "q"], ["ab", "abcd"])
    assert scores == [-1.0, 0.0]
    assert parts == {"len": [2.0, 4.0], "one": [1.0, 1.0]}
    assert reward(["p", "q"], ["ab", "abcd"]) == [-1.0, 0.0]
    assert reward.last_components == parts


def test_composite_from_config_passes_metadata_and_labels():
    reward = get_reward(
        "composite",
        components=[
            {"name": "math", "weight": 1.0},
            {"name": "format", "preset": "answer_is", "weight": 0.25, "label": "says_answer"},
            {"name": "format", "preset": "boxed", "weight": 0.5},
        ],
    )
    responses = ["so the answer is 72.", "\\boxed{7}", "I give up"]
    scores, parts = reward.score_with_components(["q"] * 3, responses, ground_truth=["72", "8", "1"])
    assert parts == {"math": [1.0, 0.0, 0.0], "says_answer": [1.0, 0.0, 0.0], "format": [0.0, 1.0, 0.0]}
    assert scores == [1.25, 0.5, 0.0]


def test_composite_config_errors():
    with pytest.raises(ValueError, match="appears twice"):
        get_reward("composite", components=[{"name": "format"}, {"name": "format"}])
    with pytest.raises(ValueError, match="no 'name'"):
        get_reward("composite", components=[{"weight": 1.0}])
    with pytest.raises(ValueError, match="at least one"):
        get_reward("composite", components=[])
    with pytest.raises(ValueError, match="on_nan"):
        get_reward("composite", components=[{"name": "format"}], on_nan="ignore")


def test_nonfinite_component_raises_naming_it():
    reward = CompositeReward({"ok": (constant(1.0), 1.0), "broken": (constant(math.nan), 1.0)})
    with pytest.raises(ValueError, match="'broken'.*non-finite"):
        reward(["p"], ["r"])


def test_nonfinite_component_zeroed_and_counted():
    flaky = lambda prompts, responses, **md: [1.0, math.inf, math.nan]  # noqa: E731
    reward = CompositeReward({"ok": (constant(1.0), 1.0), "flaky": (flaky, 2.0)}, on_nan="zero")
    assert reward(["p"] * 3, ["a", "b", "c"]) == [3.0, 1.0, 1.0]
    assert reward.nonfinite_counts == {"ok": 0, "flaky": 2}
    reward(["p"] * 3, ["a", "b", "c"])
    assert reward.nonfinite_counts["flaky"] == 4


def test_wrong_number_of_scores_names_the_component():
    reward = CompositeReward({"short": (lambda p, r, **md: [1.0], 1.0)})
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 responses"):
        reward(["p", "q"], ["a", "b"])


def test_misaligned_inputs_are_refused():
    reward = CompositeReward({"one": (constant(1.0), 1.0)})
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward(["p", "q"], ["a"])
    with pytest.raises(ValueError, match=r"metadata\['ground_truth'\] has 1 entries for 2 responses"):
        reward(["p", "q"], ["a", "b"], ground_truth=["1"])


def test_score_with_components_of_a_plain_reward():
    assert score_with_components(length_of, ["p"], ["abc"]) == ([3.0], {})
    story = get_reward("story")
    scores, parts = score_with_components(story, ["p"], ["They were happy friends and smiled."])
    assert set(parts) == {"target", "sentiment", "ending"} and len(scores) == 1


def test_importing_rewards_stays_light():
    code = (
        "import sys, rewards; heavy = [m for m in ('torch', 'transformers', 'ray', 'sympy') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
