"""Environments for multi-turn, tool-using rollouts, beside the rewards they generalise.

A reward scores one response; an environment answers each assistant turn with an observation,
a reward and done (rewards/envs/base.py). They live in the `rewards` package because they share
its rules (standard library only, importable on any worker without torch), its user-code
loading (`my_envs.py:Maze`, rewards/loading.py) and its HTTP transport (remote environments).

    from rewards.envs import get_env
    env = get_env("calculator", row={"prompt": "...", "ground_truth": "18"})

Built-in names: tools, calculator, python_sandbox, guess_number, remote. Tools: calculator,
python. Tool-call parsers: hermes.
"""

from rewards.envs import calculator as _calculator  # noqa: F401  (registrations)
from rewards.envs import guess_number as _guess_number  # noqa: F401
from rewards.envs import remote as _remote  # noqa: F401
from rewards.envs import sandbox as _sandbox  # noqa: F401
from rewards.envs.base import (
           ENVS,
           EnvError,
           Environment,
           Observation,
           Step,
           check_step,
           env_factory,
           get_env,
           register_env,
)
from rewards.envs.tools import PARSERS, TOOLS, ToolCall, ToolEnv, get_parser, get_tool, register_parser, register_tool

__all__ = ["ENVS", "PARSERS", "TOOLS", "EnvError", "Environment", "Observation", "Step", "ToolCall", "ToolEnv",
           "check_step", "env_factory", "get_env", "get_parser", "get_tool", "register_env", "register_parser",
           "register_tool"]
