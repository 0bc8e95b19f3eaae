"""Format, length and story rewards."""

from __future__ import annotations

import math
import statistics

import pytest

from rewards import get_reward
from rewards.rules import StoryReward, length_score

# ---- format -----------------------------------------------------------------------------------


def test_think_answer_preset_needs_the_whole_layout():
    reward = get_reward("format")  # preset think_answer, fullmatch
    responses = [
        "<think>\n2 + 2 is 4\n</think>\n<answer>4</answer>",
        "<think>2 + 2</think><answer>4</answer> and more text",
        "<answer>4</answer>",
        "<think></think><answer>4</answer>",
    ]
    assert reward(["q"] * 4, responses) == [1.0, 0.0, 0.0, 0.0]


def test_search_presets_and_custom_patterns():
    assert get_reward("format", preset="answer_is")(["q"] * 2, ["So The answer is 3", "answer: 3"]) == [1.0, 0.0]
    assert get_reward("format", preset="boxed")(["q"] * 2, ["\\boxed{\\frac{1}{2}}", "boxed 3"]) == [1.0, 0.0]
    assert get_reward("format", preset="gsm8k")(["q"] * 2, ["work\n#### 1,200", "#### many"]) == [1.0, 0.0]
    custom = get_reward("format", pattern=r"The End\.", mode="search", ignore_case=False)
    assert custom(["q"] * 2, ["... The End.", "the end."]) == [1.0, 0.0]
    whole = get_reward("format", pattern=r"\d+", mode="fullmatch")
    assert whole(["q"] * 2, ["123", "123 apples"]) == [1.0, 0.0]


def test_format_option_errors():
    with pytest.raises(ValueError, match="unknown format preset 'xml'.*think_answer"):
        get_reward("format", preset="xml")
    with pytest.raises(ValueError, match="mode"):
        get_reward("format", pattern="a", mode="match")


# ---- length -----------------------------------------------------------------------------------


def test_length_score_shapes_by_hand():
    """target 10, scale 5: linear 1 - d/5, gaussian exp(-d^2 / 50), tolerance 2 shifts d by 2."""
    kw = dict(target=10, scale=5.0, tolerance=0.0)
    assert length_score(10, mode="target", shape="linear", **kw) == 1.0
    assert length_score(13, mode="target", shape="linear", **kw) == pytest.approx(0.4)
    assert length_score(7, mode="target", shape="linear", **kw) == pytest.approx(0.4)
    assert length_score(30, mode="target", shape="linear", **kw) == 0.0
    assert length_score(15, mode="target", shape="gaussian", **kw) == pytest.approx(math.exp(-0.5))
    assert length_score(3, mode="max", shape="linear", **kw) == 1.0
    assert length_score(12, mode="max", shape="linear", **kw) == pytest.approx(0.6)
    assert length_score(30, mode="min", shape="linear", **kw) == 1.0
    assert length_score(8, mode="min", shape="linear", **kw) == pytest.approx(0.6)
    assert length_score(13, target=10, scale=5.0, tolerance=2.0, mode="target", shape="linear") == pytest.approx(0.8)


def test_length_reward_units():
    """target 4 words, scale defaults to 2: 4 words -> 1, 5 -> 0.5, 1 -> 0."""
    words = get_reward("length", target=4)
    assert words(["q"] * 3, ["a b c d", "a b c d e", "a"]) == [1.0, 0.5, 0.0]
    chars = get_reward("length", target=4, unit="chars", shape="gaussian", scale=1.0)
    assert chars(["q"] * 2, ["abcd", "abcde"]) == [1.0, pytest.approx(math.exp(-0.5))]
    tokens = get_reward("length", target=4, unit="tokens")
    assert tokens(["q"] * 2, ["x", "y"], num_tokens=[4, 3]) == [1.0, 0.5]


def test_length_reward_errors():
    with pytest.raises(ValueError, match="num_tokens"):
        get_reward("length", target=4, unit="tokens")(["q"], ["x"])
    with pytest.raises(ValueError, match="num_tokens"):
        get_reward("length", target=4, unit="tokens")(["q", "q"], ["x", "y"], num_tokens=[1])
    with pytest.raises(ValueError, match="unit"):
        get_reward("length", target=4, unit="lines")
    with pytest.raises(ValueError, match="target > 0"):
        get_reward("length", target=0)


# ---- story ------------------------------------------------------------------------------------

# Real samples of the untrained stories260K (temperature 1, 64 new tokens) after prompts
# "Once upon a time, there was a" / "... a little girl named" / "One day, a boy went to the".
UNTRAINED_SAMPLES = [
    "little girl named Max. Max had a shiny treat to shoot the ground. Instead, the group of animals came and brought some d",
    "girl named Lily. She was sad because there was a monster who loved to think. One day, Lily was brave and wanted to help her mommy. They watched as the pupp",
    "little girl named Lily. She loved to jump outside and like Emily. One day, she was playing with her mommy at first. Emily said they would go to the park with it.",
    "nice fight. He loved to swim in the water and watch the sun. One day, he met a little boy named Jack who liked to watch outside. He had a big m",
    "very big tree who loved teaspoons. One day, the teacher would travel for a big tree to get difficult out and gave her some a",
    "little girl named Lily. She loved to be much happy with her shoes and they loved to play and have fun. One day, Lily went to deep the park with her mommy and daddy. Her sist",
    "little girl named Lily. She had a toy brother who loved to touch pictures with her new toy car. One day, Lily's toy car stuck and her room. She looked",
    "strong girl named Lily. Lily had a tasty rope that she loved very much. One day, she went to the airport and met a woman named Jazz. Jack loved to",
    "dog named Jack. He lived in a cute day with his mom and coin in the river. One day, while they were playing lots of dinner, Tim saw a butterfly. He wanted",
    "really usienst green grown-ups. The grass were all very strong and a huge tree. The grumpy green frog lived in a",
    "red bucket. The bucket had other curples and building his hands. One day the bucket was flying and accidentally bumped high. The b",
    "kind bird named Peter. Pete loved to do decide to have fun. One day, Jarse came to the store to busie the owner. He was very happy and",
    "big potato. He lived in a shop. The pot was sad because it did silly. He ran back to a big dog. It had many colors and cars. He",
    "little girl named Lily. She loved to play with her toys and share her toys with her family. One day, Lily went to the park with her mommy and daddy. They all loved to play and lau",
    "Lily who loved to talk to her friends. One day, Lily saw attractive dog named Max. She was very tired from a pond with many cars. One day, Lily's",
    "Lily. She loved to play in the park. One day, Lily's mom the park were going to the park and went very high for her. Lily felt sad because she didn't want s",
    "Lily. She loved to play outside in her garden. One day, she saw a big tree with big white bow in the ground. She thought it was a bird. She knew that it",
    "Lily. She had a toy boy named Tommy. One day, Lily and Tommy went to the rain. They turned on the ground and set it inside. Lily found a yummy aga",
]


def test_story_parts_by_hand():
    """"They were happy friends. They smiled and played together all day." -> 9 words (>= 5).
    target words: happy, friends, smiled, together = 4 distinct -> min(1, 4/2) = 1
    sentiment: happy, friends, smiled, together positive, nothing negative -> min(1, 4/3) = 1
    ending: ends with "." -> 1.   score = 0.5 + 0.3 + 0.2 = 1.0
    "The sad dog was happy" -> target 1/2; net sentiment 1 - 1 = 0; no end punctuation -> 0.25.
    "Lily loved the park. She was sad and scared" -> target 0; net 1 - 2 < 0 -> 0; no end -> 0."""
    reward = StoryReward()
    texts = [
        "They were happy friends. They smiled and played together all day.",
        "The sad dog was happy",
        "Lily loved the park. She was sad and scared",
    ]
    scores, parts = reward.score_with_components(["p"] * 3, texts)
    assert parts == {"target": [1.0, 0.5, 0.0], "sentiment": [1.0, 0.0, 0.0], "ending": [1.0, 0.0, 0.0]}
    assert scores == pytest.approx([1.0, 0.25, 0.0])
    assert reward.last_components == parts


def test_story_reward_is_graded():
    """Each extra positive word or target word raises the score until its part saturates."""
    reward = get_reward("story")
    ladder = ["The dog ran", "The dog was good", "The dog was good and kind", "The happy dog was good and kind"]
    scores = reward(["p"] * 4, ladder)
    assert scores == sorted(scores) and len(set(scores)) == 4


def test_story_ending_needs_a_sentence_end_and_some_words():
    reward = StoryReward(weights={"target": 0.0, "sentiment": 0.0, "ending": 1.0})
    texts = ["Lily went home and slept.", 'Lily said, "Thank you so much!"', "Lily went to the", "The end."]
    assert reward(["p"] * 4, texts) == [1.0, 1.0, 0.0, 0.0]


def test_untrained_policy_rarely_maxes_the_story_reward():
    """The property the PPO/GRPO demos rely on: a low mean with spread, nothing near the max."""
    scores = get_reward("story")(["p"] * len(UNTRAINED_SAMPLES), UNTRAINED_SAMPLES)
    assert 0.05 < statistics.mean(scores) < 0.4
    assert statistics.pstdev(scores) > 0.1
    assert max(scores) < 0.9


def test_story_options():
    reward = get_reward("story", target_words=["dragon"], targets_for_full=1)
    assert reward.parts("A dragon.")["target"] == 1.0
    with pytest.raises(ValueError, match="weights"):
        get_reward("story", weights={"target": 1.0})
    with pytest.raises(ValueError, match="targets_for_full"):
        get_reward("story", targets_for_full=0)
