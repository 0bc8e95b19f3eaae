"""Guess the number: a multi-turn game with a deterministic checker.

The row's `target` (or, without one, a number drawn from a hash of the prompt, so an episode is
reproducible) lies in [low, high]. Each assistant turn is read for its first integer, in digits
or as an English word up to twenty ("three": small models write words before digits); the
observation is "higher", "lower" or "correct", or a hint when the turn has no number. Reward 1
when it is guessed (minus `turn_penalty` per turn taken, to favour few turns), else 0.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from rewards.envs.base import Step, register_env

_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
          "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"]
_NUMBER = re.compile(r"-?\d+|\b(?:" + "|".join(_WORDS) + r")\b", re.IGNORECASE)


@register_env("guess_number")
class GuessNumber:
    tools: list = []

    def __init__(self, row: dict[str, Any], low: int = 1, high: int = 10, turn_penalty: float = 0.0):
        if low > high:
            raise ValueError(f"guess_number: low={low} > high={high}")
        target = row.get("target")
        if target is None:
            digest = hashlib.sha256(str(row.get("prompt", "")).encode()).digest()
            target = low + int.from_bytes(digest[:8], "big") % (high - low + 1)
        self.target, self.low, self.high, self.turn_penalty = int(target), low, high, turn_penalty
        self.turns = 0
        self.tools = []

    def step(self, turn: str) -> Step:
        self.turns += 1
        found = _NUMBER.search(turn)
        if found is None:
            return Step(f"Please answer with a number between {self.low} and {self.high}.", 0.0, False,
                        {"valid": 0.0})
        text = found.group().lower()
        guess = _WORDS.index(text) if text in _WORDS else int(text)
        if guess == self.target:
            return Step("correct", max(0.0, 1.0 - self.turn_penalty * (self.turns - 1)), True,
                        {"valid": 1.0, "solved": 1.0})
        return Step("higher" if guess < self.target else "lower", 0.0, False, {"valid": 1.0})
