"""Rule rewards: response format, response length, and the story reward for stories260K.

All three are pure functions of the text (length can also read token counts from metadata),
cheap enough to run on the driver for every rollout.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

from rewards.base import check_inputs, register_reward

# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------

# name -> (pattern, mode); `fullmatch` patterns must cover the whole response.
FORMAT_PRESETS = {
    "think_answer": (r"\s*<think>.+?</think>\s*<answer>.+?</answer>\s*", "fullmatch"),
    "answer_is": (r"\bthe (?:final )?answer is\b", "search"),
    "boxed": (r"\\boxed\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}", "search"),
    "gsm8k": (r"####\s*-?[\d,]*\.?\d+\s*$", "search"),
}


@register_reward("format")
class FormatReward:
    """1 when the response matches a regex, else 0.

    Either a `preset` (see FORMAT_PRESETS) or your own `pattern` with `mode` "search" (anywhere)
    or "fullmatch" (the whole response). `.` matches newlines (DOTALL) so a pattern can span
    a multi-line reasoning block.
    """

    def __init__(
        self, preset: str | None = "think_answer", pattern: str | None = None, mode: str | None = None, ignore_case: bool = True
    ):
        if pattern is None:
            if preset not in FORMAT_PRESETS:
                raise ValueError(f"unknown format preset {preset!r}; valid: {sorted(FORMAT_PRESETS)} (or pass pattern=)")
            pattern, preset_mode = FORMAT_PRESETS[preset]
            mode = mode or preset_mode
        mode = mode or "search"
        if mode not in ("search", "fullmatch"):
            raise ValueError(f"format mode must be 'search' or 'fullmatch', got {mode!r}")
        flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0) | (re.MULTILINE if mode == "search" else 0)
        self.regex = re.compile(pattern, flags)
        self.match = self.regex.fullmatch if mode == "fullmatch" else self.regex.search

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]:
        return [1.0 if self.match(r) else 0.0 for r in responses]


# ---------------------------------------------------------------------------------------------
# Length
# ---------------------------------------------------------------------------------------------


def length_score(length: float, target: float, *, mode: str, shape: str, scale: float, tolerance: float) -> float:
    """Score in [0, 1] of a length against a target.

    distance = |length - target| (mode "target"), only the excess (mode "max") or only the
    shortfall (mode "min"), minus a `tolerance` band scored 1; then "linear": 1 - d / scale
    floored at 0, or "gaussian": exp(-d^2 / (2 scale^2)).
    """
    if mode == "target":
        d = abs(length - target)
    elif mode == "max":
        d = max(0.0, length - target)
    else:
        d = max(0.0, target - length)
    d = max(0.0, d - tolerance)
    if shape == "linear":
        return max(0.0, 1.0 - d / scale)
    return math.exp(-0.5 * (d / scale) ** 2)


@register_reward("length")
class LengthReward:
    """Reward a response length near `target`, in `unit`s: "words", "chars", or "tokens".

    "tokens" reads the rollout's counts from `metadata["num_tokens"]` (one int per response),
    so this module never needs a tokenizer. `scale` defaults to target / 2.
    """

    def __init__(
        self,
        target: float,
        unit: str = "words",
        mode: str = "target",
        shape: str = "linear",
        scale: float | None = None,
        tolerance: float = 0.0,
    ):
        if unit not in ("words", "chars", "tokens"):
            raise ValueError(f"length unit must be 'words', 'chars' or 'tokens', got {unit!r}")
        if mode not in ("target", "max", "min"):
            raise ValueError(f"length mode must be 'target', 'max' or 'min', got {mode!r}")
        if shape not in ("linear", "gaussian"):
            raise ValueError(f"length shape must be 'linear' or 'gaussian', got {shape!r}")
        if target <= 0 or (scale is not None and scale <= 0) or tolerance < 0:
            raise ValueError(f"need target > 0, scale > 0, tolerance >= 0; got {target}, {scale}, {tolerance}")
        self.target, self.unit, self.mode, self.shape = float(target), unit, mode, shape
        self.scale = float(scale) if scale is not None else self.target / 2
        self.tolerance = float(tolerance)

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]:
        if self.unit == "tokens":
            if "num_tokens" not in metadata:
                raise ValueError("length reward with unit='tokens' needs metadata['num_tokens'] (one count per response)")
            check_inputs(prompts, responses, {"num_tokens": list(metadata["num_tokens"])})
            lengths = [float(n) for n in metadata["num_tokens"]]
        elif self.unit == "words":
            lengths = [float(len(r.split())) for r in responses]
        else:
            lengths = [float(len(r)) for r in responses]
        return [
            length_score(n, self.target, mode=self.mode, shape=self.shape, scale=self.scale, tolerance=self.tolerance)
            for n in lengths
        ]


# ---------------------------------------------------------------------------------------------
# Story
# ---------------------------------------------------------------------------------------------

# Kind-and-friendly theme words. Rare in the untrained stories260K's samples (one sample in
# five mentions any), so the policy has something to learn; "loved" is left out because the
# model already writes "X loved to play" in half of its stories.
STORY_TARGET_WORDS = (
    "happy", "kind", "friend", "friends", "smile", "smiled", "hug", "hugged",
    "share", "shared", "together", "laugh", "laughed", "thank",
)
POSITIVE_WORDS = frozenset(
    """happy happily glad joy fun funny good great nice kind kindly friend friends friendly love lovely
    loved loves smile smiled smiling laugh laughed laughing hug hugged share shared sharing help helped helpful
    thank thanked thanks together beautiful pretty proud excited safe best yummy brave gentle special
    wonderful amazing cheerful warm care cared caring enjoy enjoyed favorite""".split()
)
NEGATIVE_WORDS = frozenset(
    """sad sadly angry mad scared afraid cry cried crying hurt hurts bad mean lost broke broken upset
    sorry tired sick lonely worried scary grumpy naughty fight fought bored hate hated ugly
    dangerous terrible""".split()
)
_WORD_RE = re.compile(r"[a-z]+")
_PROPER_END_RE = re.compile(r"[.!?][\"'”’)]*\s*$")

STORY_WEIGHTS = {"target": 0.5, "sentiment": 0.3, "ending": 0.2}


@register_reward("story")
class StoryReward:
    """A graded story reward in [0, 1] for the stories260K demos:

        story = 0.5 * target + 0.3 * sentiment + 0.2 * ending
        target    = min(1, #distinct target words in the response / targets_for_full)
        sentiment = clip((#positive - #negative word occurrences) / sentiment_for_full, 0, 1)
        ending    = 1 if the response has >= min_words words and ends with . ! or ? (a closing
                    quote allowed), else 0

    Why these parts: the untrained stories260K (temperature 1, 64 new tokens) rarely uses the
    target words, writes positive words only now and then, and is cut off mid-sentence ~95% of
    the time, so each part has room to climb; all three are counts or text properties a policy
    can move within a few hundred CPU updates. Measured: 48 samples of "Once upon a time, there
    was a": mean 0.26, std 0.23, one sample of 48 at the max, no group of 4 with zero
    variance; 60 samples over three story prompts: mean 0.18, std 0.19 (parts: target 0.13,
    sentiment 0.34, ending 0.05).
    Each part is kept in `last_components` and returned by `score_with_components`, so a
    trainer logs `reward/target`, `reward/sentiment` and `reward/ending`.
    """

    def __init__(
        self,
        target_words: Sequence[str] = STORY_TARGET_WORDS,
        targets_for_full: int = 2,
        sentiment_for_full: int = 3,
        min_words: int = 5,
        weights: dict[str, float] | None = None,
    ):
        weights = dict(STORY_WEIGHTS if weights is None else weights)
        if set(weights) != set(STORY_WEIGHTS):
            raise ValueError(f"story weights must have exactly the keys {sorted(STORY_WEIGHTS)}, got {sorted(weights)}")
        if targets_for_full < 1 or sentiment_for_full < 1 or not target_words:
            raise ValueError("story reward needs target_words, targets_for_full >= 1 and sentiment_for_full >= 1")
        self.target_words = frozenset(w.lower() for w in target_words)
        self.targets_for_full, self.sentiment_for_full, self.min_words = targets_for_full, sentiment_for_full, min_words
        self.weights = weights
        self.last_components: dict[str, list[float]] = {}

    def parts(self, response: str) -> dict[str, float]:
        """The three unweighted parts of one response's score."""
        words = _WORD_RE.findall(response.lower())
        hits = len(self.target_words.intersection(words))
        net = sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)
        ended = len(words) >= self.min_words and bool(_PROPER_END_RE.search(response))
        return {
            "target": min(1.0, hits / self.targets_for_full),
            "sentiment": min(1.0, max(0.0, net / self.sentiment_for_full)),
            "ending": 1.0 if ended else 0.0,
        }

    def score_with_components(
        self, prompts: list[str], responses: list[str], **metadata: Any
    ) -> tuple[list[float], dict[str, list[float]]]:
        check_inputs(prompts, responses, {})
        per_response = [self.parts(r) for r in responses]
        components = {k: [p[k] for p in per_response] for k in STORY_WEIGHTS}
        scores = [sum(self.weights[k] * p[k] for k in STORY_WEIGHTS) for p in per_response]
        self.last_components = components
        return scores, components

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]:
        return self.score_with_components(prompts, responses, **metadata)[0]
