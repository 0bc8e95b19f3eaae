"""The reward protocol, the registry, and weighted composition.

A reward is any callable `fn(prompts, responses, **metadata) -> list[float]`: one score per
(prompt, response) pair. Per-sample metadata travels as keyword lists aligned with the
responses (e.g. `ground_truth=["72", "18", ...]`); a reward reads the keys it needs and
ignores the rest, so one metadata dict can feed every component of a composite.

The registry maps a name to a factory: `get_reward(name, **options)` calls the factory with
the options and returns the reward. Built-in rewards register themselves when `rewards` is
imported; none of them imports torch, transformers or ray.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Protocol, Sequence, runtime_checkable


@runtime_checkable
class RewardFn(Protocol):
    """Score each response to its prompt; higher is better."""

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]: ...


# name -> factory(**options) -> RewardFn
REWARDS: dict[str, Callable[..., RewardFn]] = {}


def registrar(table: dict[str, Callable[..., Any]], kind: str) -> Callable[[str], Callable]:
    """`register(name)` for `table`: a decorator adding a factory (a class or a function) under
    `name`, refusing a name already taken. Rewards, environments and tools register this way."""

    def register(name: str):
        def decorator(factory):
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered (by {table[name]!r})")
            table[name] = factory
            return factory

        return decorator

    return register


register_reward = registrar(REWARDS, "reward")


def get_reward(name: str, **options: Any) -> RewardFn:
    """Build the reward registered under `name` with `options`; fail listing the valid names.

    A name with a colon is the user's own code (`rewards.loading`): `my_rewards.py:score` or
    `my_pkg.rewards:Score`; a class is built with `options`, a function is the reward itself.
    """
    if ":" in name:
        from rewards.loading import build, load_object

        return build(load_object(name), options, name)
    try:
        factory = REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; valid: {sorted(REWARDS)}, or your own as "
                       "'path/to/file.py:fn' or 'package.module:fn'") from None
    return factory(**options)


def check_scores(scores: Sequence[float], n: int, name: str) -> list[float]:
    """Return `scores` as a list of floats, failing when it does not hold one score per response."""
    scores = [float(s) for s in scores]
    if len(scores) != n:
        raise ValueError(f"reward {name!r} returned {len(scores)} scores for {n} responses")
    return scores


def check_inputs(prompts: Sequence[str], responses: Sequence[str], metadata: dict[str, Any]) -> None:
    """Fail unless prompts, responses and every per-sample metadata list have the same length."""
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    for key, values in metadata.items():
        if isinstance(values, (list, tuple)) and len(values) != len(responses):
            raise ValueError(f"metadata[{key!r}] has {len(values)} entries for {len(responses)} responses")


class CompositeReward:
    """A weighted sum of rewards: score_i = sum_k w_k * r_k(prompt_i, response_i).

    Each component's unweighted scores are kept in `last_components` after every call (and
    returned by `score_with_components`), so a trainer logs them as `reward/<name>`.

    A non-finite component score is an error naming the component (`on_nan="raise"`), or is
    replaced by 0 and counted in `nonfinite_counts[name]` (`on_nan="zero"`).
    """

    def __init__(self, components: dict[str, tuple[RewardFn, float]], on_nan: str = "raise"):
        if not components:
            raise ValueError("a composite reward needs at least one component")
        if on_nan not in ("raise", "zero"):
            raise ValueError(f"on_nan must be 'raise' or 'zero', got {on_nan!r}")
        for name, (_, weight) in components.items():
            if not math.isfinite(float(weight)):
                raise ValueError(f"component {name!r} has a non-finite weight {weight!r}")
        self.components = {name: (fn, float(weight)) for name, (fn, weight) in components.items()}
        self.on_nan = on_nan
        self.nonfinite_counts = {name: 0 for name in components}
        self.last_components: dict[str, list[float]] = {}

    def score_with_components(
        self, prompts: list[str], responses: list[str], **metadata: Any
    ) -> tuple[list[float], dict[str, list[float]]]:
        """Return (weighted total per response, {component name: its unweighted scores})."""
        check_inputs(prompts, responses, metadata)
        per_component: dict[str, list[float]] = {}
        totals = [0.0] * len(responses)
        for name, (fn, weight) in self.components.items():
            scores = check_scores(fn(prompts, responses, **metadata), len(responses), name)
            scores = self._finite(name, scores)
            per_component[name] = scores
            totals = [t + weight * s for t, s in zip(totals, scores)]
        self.last_components = per_component
        return totals, per_component

    def __call__(self, prompts: list[str], responses: list[str], **metadata: Any) -> list[float]:
        return self.score_with_components(prompts, responses, **metadata)[0]

    def _finite(self, name: str, scores: list[float]) -> list[float]:
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if not bad:
            return scores
        if self.on_nan == "raise":
            raise ValueError(
                f"reward component {name!r} returned non-finite scores at indices {bad[:10]} "
                f"(e.g. {scores[bad[0]]}); pass on_nan='zero' to replace them with 0 and count them"
            )
        self.nonfinite_counts[name] += len(bad)
        return [s if math.isfinite(s) else 0.0 for s in scores]


def score_with_components(
    reward: RewardFn, prompts: list[str], responses: list[str], **metadata: Any
) -> tuple[list[float], dict[str, list[float]]]:
    """Scores and per-component scores of any reward; a plain reward has no components ({})."""
    if hasattr(reward, "score_with_components"):
        return reward.score_with_components(prompts, responses, **metadata)
    check_inputs(prompts, responses, metadata)
    return check_scores(reward(prompts, responses, **metadata), len(responses), "reward"), {}


@register_reward("composite")
def composite_reward(components: Sequence[dict[str, Any]], on_nan: str = "raise") -> CompositeReward:
    """Build a `CompositeReward` from config entries `{"name": ..., "weight": 1.0, **options}`.

    An entry may carry `"label"` to log it under another name, which lets the same reward
    appear twice with different options (e.g. two format patterns).
    """
    built: dict[str, tuple[RewardFn, float]] = {}
    for i, entry in enumerate(components):
        entry = dict(entry)
        if "name" not in entry:
            raise ValueError(f"composite component #{i} has no 'name': {entry}")
        name = entry.pop("name")
        weight = entry.pop("weight", 1.0)
        label = entry.pop("label", name)
        if label in built:
            raise ValueError(f"composite component label {label!r} appears twice; give one a 'label'")
        built[label] = (get_reward(name, **entry), weight)
    return CompositeReward(built, on_nan=on_nan)
