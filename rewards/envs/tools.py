"""Tools, tool-call parsers, and the environment that runs a model's tool calls.

A tool is a callable with a `name` and an OpenAI-style `schema`
(`{"type": "function", "function": {"name", "description", "parameters"}}`), called with the
call's JSON arguments as keywords and returning text. The schemas go to the tokenizer's chat
template (`apply_chat_template(..., tools=[t.schema for t in tools])`), which renders them in
the model's own format. A plain Python function with a Google-style docstring is a tool too:
`as_tool` builds its schema with `transformers.utils.get_json_schema`, as TRL does.

A parser finds the tool calls in a generated turn, in the format the model's template teaches.
`hermes` (Hermes, Qwen2.5/Qwen3, and our fallback template): each call is
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Register another with
`@register_parser(name)`: `parse(text) -> (calls, errors)`.

`ToolEnv` is the environment: a turn with tool calls gets one tool message per call (the
result, or an error a model can read: malformed JSON, an unknown tool, bad arguments, an
exception); a turn without calls is the final answer, scored by a reward (by default the math
reward against the row's `ground_truth`). Nothing a model writes raises out of `step`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from rewards.base import registrar
from rewards.envs.base import EnvError, Step, register_env


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ parsers

PARSERS: dict[str, Callable[[str], tuple[list[ToolCall], list[str]]]] = {}


register_parser = registrar(PARSERS, "tool-call parser")  # decorator: a parser of generated text under a name


def get_parser(name: str) -> Callable[[str], tuple[list[ToolCall], list[str]]]:
    if ":" in name:
        from rewards.loading import load_object

        return load_object(name)
    try:
        return PARSERS[name]
    except KeyError:
        raise EnvError(f"unknown tool-call parser {name!r}; valid: {sorted(PARSERS)}") from None


_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@register_parser("hermes")
def parse_hermes(text: str) -> tuple[list[ToolCall], list[str]]:
    """`<tool_call>{"name": "f", "arguments": {...}}</tool_call>` blocks (an unclosed last block
    counts, as generation may stop inside it); returns (calls, one error message per bad block)."""
    calls, errors = [], []
    for block in _HERMES.findall(text):
        block = block.strip()
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as err:
            errors.append(f"tool call is not valid JSON ({err.msg} at char {err.pos}): {block[:200]!r}")
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            errors.append(f'tool call must be {{"name": ..., "arguments": {{...}}}}, got {block[:200]!r}')
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models emit the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        if not isinstance(args, dict):
            errors.append(f"tool call {obj['name']!r}: arguments must be a JSON object, got {args!r:.200}")
            continue
        calls.append(ToolCall(obj["name"], args))
    return calls, errors


# -------------------------------------------------------------------------------------- tools

# name -> factory(**options) -> tool
TOOLS: dict[str, Callable[..., Any]] = {}


register_tool = registrar(TOOLS, "tool")  # decorator: a tool factory under a name


def as_tool(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A tool from `fn`: itself when it has a `schema`, else `fn` with a schema built from its
    signature and Google-style docstring (`transformers.utils.get_json_schema`)."""
    if getattr(fn, "schema", None) is not None:
        return fn
    from transformers.utils import get_json_schema

    schema = get_json_schema(fn)
    wrapper = _FunctionTool(fn, schema["function"]["name"], schema)
    return wrapper


@dataclass
class _FunctionTool:
    fn: Callable[..., Any]
    name: str
    schema: dict[str, Any]

    def __call__(self, **arguments: Any) -> str:
        return str(self.fn(**arguments))


def get_tool(spec: str | dict[str, Any]) -> Callable[..., Any]:
    """A tool from a registry name, a `file.py:fn` / `module:fn` spec, or `{"name": ..., **options}`."""
    options: dict[str, Any] = {}
    if isinstance(spec, dict):
        options = dict(spec)
        spec = options.pop("name")
    if ":" in spec:
        from rewards.loading import build, load_object

        return as_tool(build(load_object(spec), options, spec))
    try:
        return as_tool(TOOLS[spec](**options))
    except KeyError:
        raise EnvError(f"unknown tool {spec!r}; valid: {sorted(TOOLS)}, or your own as 'file.py:fn'") from None


def run_tool(tools: dict[str, Callable[..., Any]], call: ToolCall) -> tuple[str, bool]:
    """(the tool's result text, ok); an unknown tool, bad arguments or an exception is an error text."""
    tool = tools.get(call.name)
    if tool is None:
        return f"error: unknown tool {call.name!r}; available: {sorted(tools)}", False
    try:
        return str(tool(**call.arguments)), True
    except TypeError as err:
        return f"error: bad arguments for {call.name!r}: {err}", False
    except Exception as err:  # a tool's failure is the model's observation, never the run's crash
        return f"error: {call.name!r} failed: {type(err).__name__}: {err}", False


# ---------------------------------------------------------------------------- the environment


@register_env("tools")
class ToolEnv:
    """Tool calls answered with tool messages until a turn without calls, the final answer.

    row: the data row (its `prompt`, `ground_truth`, ...: passed to the answer reward as metadata).
    tools: tool names / specs / {"name": ..., **options} (`get_tool`), or built tools.
    parser: the tool-call format (`PARSERS`).
    reward: the final answer's reward (a registered name or `file.py:fn`), with `reward_options`.
    max_result_chars: a tool result is cut to this many characters (the rest would flood the context).
    """

    def __init__(self, row: dict[str, Any], tools: Sequence[Any] = (), parser: str = "hermes",
                 reward: str = "math", reward_options: dict[str, Any] | None = None,
                 max_result_chars: int = 2000):
        from rewards import get_reward

        built = [t if callable(t) and hasattr(t, "schema") else get_tool(t) for t in tools]
        self.tools_by_name = {t.name: t for t in built}
        self.tools = [t.schema for t in built]
        self.parse = get_parser(parser)
        self.reward_fn = get_reward(reward, **(reward_options or {}))
        self.row, self.max_result_chars = row, max_result_chars

    def step(self, turn: str) -> Step:
        calls, errors = self.parse(turn)
        if not calls and not errors:
            score = self.reward_fn([self.row.get("prompt", "")], [turn], ground_truth=[self.row.get("ground_truth")])[0]
            return Step("", float(score), True, {"tool_calls": 0, "tool_errors": 0})
        results = [run_tool(self.tools_by_name, call) for call in calls]
        messages = [{"role": "tool", "name": call.name, "content": text[: self.max_result_chars]}
                    for call, (text, _) in zip(calls, results)]
        messages += [{"role": "tool", "content": f"error: {e}"} for e in errors]
        bad = len(errors) + sum(not ok for _, ok in results)
        return Step(messages, 0.0, False, {"tool_calls": len(calls) + len(errors), "tool_errors": bad})
