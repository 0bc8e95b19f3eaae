"""A calculator tool (safe arithmetic: the expression's syntax tree is walked, never `eval`'d)
and the `calculator` environment: tool calls for GSM8K-style problems, the final answer scored
by the math reward against the row's `ground_truth`."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from rewards.envs.base import register_env
from rewards.envs.tools import ToolEnv, register_tool

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MAX_EXPONENT = 100  # 10**10**10 would hang the process: bound exponents
MAX_LENGTH = 200


def calculate(expression: str) -> float | int:
    """The value of an arithmetic expression of numbers, + - * / // % ** and parentheses.

    Raises ValueError naming what is not allowed (names, calls, attributes, huge powers...)."""
    if len(expression) > MAX_LENGTH:
        raise ValueError(f"expression longer than {MAX_LENGTH} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace(",", ""), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {err.msg}") from None
    return _value(tree.body)


def _value(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > MAX_EXPONENT or abs(left) > 1e6):
            raise ValueError(f"power too large: {left} ** {right}")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if isinstance(result, complex) or (isinstance(result, float) and not math.isfinite(result)):
            raise ValueError("result is not a finite real number")
        return result
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise ValueError(f"not allowed in a calculation: {ast.dump(node)[:60]}")


class Calculator:
    """The tool: `calculator(expression="48 / 2 + 7")` -> "31"."""

    name = "calculator"
    schema = {"type": "function", "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression (+ - * / // % ** and parentheses).",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string",
                       "description": "e.g. '48 / 2 + 7'"}}, "required": ["expression"]}}}

    def __call__(self, expression: str) -> str:
        try:
            value = calculate(str(expression))
        except ValueError as err:
            return f"error: {err}"
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(round(value, 6) if isinstance(value, float) else value)


register_tool("calculator")(Calculator)


@register_env("calculator")
def calculator_env(row: dict[str, Any], reward: str = "math", parser: str = "hermes", **options: Any) -> ToolEnv:
    """GSM8K with a calculator: tool calls until an answer, scored by `reward` (math) on `ground_truth`."""
    return ToolEnv(row, tools=[Calculator()], parser=parser, reward=reward, **options)
