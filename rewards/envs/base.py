"""The environment protocol and its registry.

An environment is one episode: it is created per prompt from the data row, receives each
assistant turn (the text the model generated in that turn), and answers with a `Step`: an
observation (text, or chat messages such as tool results), a reward for that turn, and whether
the episode is done. The episode's score is the sum of its turns' rewards (a final-only reward
is a reward on the last turn; a per-turn shaping reward adds up), as in veRL's agent loop and
TRL's environments.

    from rewards.envs import get_env
    env = get_env("guess_number", row={"prompt": "...", "target": 7}, low=1, high=10)
    step = env.step("I guess 5")       # Step(observation='higher', reward=0.0, done=False)

`tools` (a list of OpenAI-style function schemas, `[]` for none) is what the rollout passes to
the tokenizer's chat template (`apply_chat_template(..., tools=env.tools)`).

The registry maps a name to a factory `factory(row, **options) -> Environment`. A name with a
colon is the user's own class or function (`my_envs.py:Maze`, `my_pkg.envs:Maze`), loaded like
a user reward (`rewards.loading`). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Union, runtime_checkable

from rewards.base import registrar

# An observation is text (rendered as a user turn) or chat messages ({"role": "tool" | "user", "content": ...}).
Observation = Union[str, list[dict[str, Any]]]


class EnvError(ValueError):
    """A bad environment name or options, or an environment that broke its protocol."""


@dataclass
class Step:
    """What an environment returns for one assistant turn.

    observation: appended to the conversation before the model's next turn (ignored once done).
    reward: this turn's reward; the episode's score is the sum over its turns.
    done: the episode is over (the model's answer was final, or the game ended).
    info: anything to log (e.g. {"tool_calls": 1, "tool_errors": 0}); numbers are averaged into metrics.
    """

    observation: Observation = ""
    reward: float = 0.0
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """One episode. `tools`: function schemas for the chat template ([] for none)."""

    tools: list[dict[str, Any]]

    def step(self, turn: str) -> Step:
        """Take the assistant's turn (its generated text, special tokens stripped)."""
        ...


# name -> factory(row, **options) -> Environment
ENVS: dict[str, Callable[..., Environment]] = {}


register_env = registrar(ENVS, "environment")  # decorator: an environment factory under a name


def env_factory(name: str) -> Callable[..., Environment]:
    """The factory registered under `name`, or the user's class/function a `file.py:attr` or
    `module:attr` name points to; an unknown name is an error listing the valid ones."""
    if ":" in name:
        from rewards.loading import load_object

        factory = load_object(name)
        if not callable(factory):
            raise EnvError(f"environment {name!r} is not a class or a function")
        return factory
    try:
        return ENVS[name]
    except KeyError:
        raise EnvError(f"unknown environment {name!r}; valid: {sorted(ENVS)}, or your own as "
                       "'path/to/file.py:Class' or 'package.module:Class'") from None


def get_env(name: str, row: dict[str, Any], **options: Any) -> Environment:
    """A fresh episode of environment `name` for the data row `row`."""
    env = env_factory(name)(row=row, **options)
    if not callable(getattr(env, "step", None)):
        raise EnvError(f"environment {name!r} built {type(env).__name__}, which has no step(turn) method")
    if not hasattr(env, "tools"):
        env.tools = []
    return env


def check_step(step: Any, name: str) -> Step:
    """Fail naming the environment when `step` returned something other than a `Step`."""
    if isinstance(step, Step):
        return step
    if isinstance(step, tuple) and len(step) in (3, 4):  # (observation, reward, done[, info]), gym-like
        return Step(*step)
    raise EnvError(f"environment {name!r} returned {type(step).__name__} from step(); expected rewards.envs.Step "
                   "or an (observation, reward, done) tuple")
