"""Reward functions behind one protocol: `fn(prompts, responses, **metadata) -> list[float]`.

    from rewards import get_reward
    reward = get_reward("math")                  # metadata: ground_truth=[...]
    reward = get_reward("composite", components=[{"name": "math", "weight": 1.0},
                                                 {"name": "format", "preset": "answer_is", "weight": 0.1}])

Built-in names: composite, math, format, length, story, remote. Importing this package imports
only the standard library (sympy is imported lazily by the math reward, when installed).
"""

# Imported for their registrations.
from rewards import math as _math  # noqa: E402,F401
from rewards import remote as _remote  # noqa: E402,F401
from rewards import rules as _rules  # noqa: E402,F401
from rewards.base import REWARDS, CompositeReward, RewardFn, get_reward, register_reward, score_with_components

__all__ = ["REWARDS", "CompositeReward", "RewardFn", "get_reward", "register_reward", "score_with_components"]
