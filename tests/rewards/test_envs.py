"""Environments: the protocol and registry, tool-call parsing, the calculator, the guessing game,
user environments from a file, and remote environments over HTTP."""

from __future__ import annotations

import threading
import time

import pytest

from rewards.envs import ENVS, EnvError, Step, get_env, get_parser, get_tool
from rewards.envs.calculator import calculate


def test_builtin_environments_are_registered():
    assert {"tools", "calculator", "python_sandbox", "guess_number", "remote"} <= set(ENVS)


def test_unknown_environment_lists_the_valid_ones():
    with pytest.raises(EnvError, match=r"unknown environment 'maze'.*'calculator'.*'guess_number'"):
        get_env("maze", row={})


def test_hermes_parser_reads_calls_and_reports_malformed_ones():
    parse = get_parser("hermes")
    text = ('I will compute. <tool_call>{"name": "calculator", "arguments": {"expression": "2+3"}}</tool_call>'
            '<tool_call>{"name": "calculator", "arguments": {oops}</tool_call>'
            '<tool_call>["not", "an", "object"]</tool_call>'
            '<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}')  # unclosed, args as a string
    calls, errors = parse(text)
    assert [(c.name, c.arguments) for c in calls] == [("calculator", {"expression": "2+3"}), ("python", {"code": "print(1)"})]
    assert len(errors) == 2 and "not valid JSON" in errors[0] and '{"name": ...' in errors[1]
    assert parse("The answer is 5.") == ([], [])
    with pytest.raises(EnvError, match="unknown tool-call parser 'xml'"):
        get_parser("xml")


@pytest.mark.parametrize("expr, value", [("2+3*4", 14), ("(48 / 2) + 7", 31.0), ("2**10", 1024), ("-3 % 5", 2),
                                         ("1,000 * 3", 3000), ("7 // 2", 3), ("2^3", 8)])
def test_calculator_computes_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr, match", [
    ("__import__('os').system('ls')", "not allowed"), ("open('x')", "not allowed"), ("a + 1", "not allowed"),
    ("9**9**9", "power too large"), ("1/0", "division by zero"), ("2 +", "not an arithmetic expression"),
    ("1" * 300, "longer than"),
])
def test_calculator_refuses_anything_but_arithmetic(expr, match):
    with pytest.raises(ValueError, match=match):
        calculate(expr)


def test_calculator_episode_tool_call_then_scored_answer():
    env = get_env("calculator", row={"prompt": "What is 48/2+7?", "ground_truth": "31"})
    assert env.tools[0]["function"]["name"] == "calculator"
    step = env.step('<tool_call>{"name": "calculator", "arguments": {"expression": "48/2+7"}}</tool_call>')
    assert not step.done and step.reward == 0.0
    assert step.observation == [{"role": "tool", "name": "calculator", "content": "31"}]
    assert step.info == {"tool_calls": 1, "tool_errors": 0}
    final = env.step("The answer is #### 31")
    assert final.done and final.reward == 1.0
    assert env.step("#### 30").reward == 0.0


def test_malformed_and_unknown_tool_calls_are_observations_not_crashes():
    env = get_env("calculator", row={"prompt": "q", "ground_truth": "1"})
    step = env.step('<tool_call>{"name": "calc", "arguments": {}}</tool_call><tool_call>{bad json</tool_call>'
                    '<tool_call>{"name": "calculator", "arguments": {"x": 1}}</tool_call>'
                    '<tool_call>{"name": "calculator", "arguments": {"expression": "import os"}}</tool_call>')
    texts = [m["content"] for m in step.observation]
    assert not step.done and step.info == {"tool_calls": 4, "tool_errors": 3}
    assert "unknown tool 'calc'" in texts[0] and "bad arguments for 'calculator'" in texts[1]
    assert texts[2].startswith("error: not an arithmetic expression") and "not valid JSON" in texts[3]


def test_guess_number_gives_higher_lower_and_rewards_the_hit():
    env = get_env("guess_number", row={"prompt": "p", "target": 7}, low=1, high=10, turn_penalty=0.1)
    assert env.step("no idea").observation.startswith("Please answer with a number")
    assert (env.step("5").observation, env.step("I say Nine cats").observation) == ("higher", "lower")
    hit = env.step("7")
    assert hit.done and hit.observation == "correct" and hit.reward == pytest.approx(1.0 - 0.1 * 3)


def test_guess_number_without_target_is_deterministic_per_prompt():
    targets = {get_env("guess_number", row={"prompt": f"p{i}"}, low=1, high=4).target for i in range(20)}
    assert targets <= {1, 2, 3, 4} and len(targets) > 1
    assert get_env("guess_number", row={"prompt": "p3"}).target == get_env("guess_number", row={"prompt": "p3"}).target


def test_user_environment_and_tool_from_files(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(
        "from rewards.envs import Step\n"
        "class Echo:\n"
        "    tools = []\n"
        "    def __init__(self, row, times=2):\n"
        "        self.left = times\n"
        "    def step(self, turn):\n"
        "        self.left -= 1\n"
        "        return Step(turn.upper(), 0.5, self.left == 0)\n"
        "def shout(text: str) -> str:\n"
        '    """Shout.\n\n    Args:\n        text: what to shout\n    """\n'
        "    return text.upper() + '!'\n")
    monkeypatch.chdir(tmp_path)
    env = get_env("my_envs.py:Echo", row={}, times=2)
    assert env.step("hi") == Step("HI", 0.5, False) and env.step("x").done
    tool = get_tool("my_envs.py:shout")
    assert tool.name == "shout" and tool.schema["function"]["parameters"]["required"] == ["text"]
    env = get_env("tools", row={"prompt": "q", "ground_truth": "1"}, tools=["my_envs.py:shout", "calculator"])
    step = env.step('<tool_call>{"name": "shout", "arguments": {"text": "hey"}}</tool_call>')
    assert step.observation[0]["content"] == "HEY!"


def test_remote_environment_over_loopback_http():
    from rewards.envs.remote import make_env_server

    server = make_env_server("guess_number", {"low": 1, "high": 10})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        env = get_env("remote", row={"prompt": "p", "target": 3}, url=server.url, timeout=5, retries=1, backoff=0.01)
        assert env.tools == []
        assert env.step("5").observation == "lower"
        # a retried step (same turn number) is answered from the stored reply, not stepped again
        again = env._post("step", {"episode": env.episode, "turn": 1, "text": "3"})
        assert again["observation"] == "lower"
        done = env.step("3")
        assert done.done and done.reward == 1.0
    finally:
        server.shutdown()
        server.server_close()


def test_remote_environment_unreachable_fails_after_retries():
    from rewards.remote.client import RemoteRewardError

    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError, match="failed after 2 attempts"):
        get_env("remote", row={}, url="http://127.0.0.1:9", timeout=1, retries=1, backoff=0.01)
    assert time.perf_counter() - t0 < 10


def test_an_environment_breaking_the_protocol_is_named():
    from rewards.envs import check_step

    assert check_step(("obs", 1.0, True), "gym-like") == Step("obs", 1.0, True)
    with pytest.raises(EnvError, match=r"environment 'mine' returned dict from step\(\)"):
        check_step({"observation": "x"}, "mine")
    ENVS["test-no-step"] = lambda row: object()
    try:
        with pytest.raises(EnvError, match="has no step"):
            get_env("test-no-step", row={})
    finally:
        del ENVS["test-no-step"]
