"""The README's "your own reward, environment and tool" examples, run exactly as written: each
snippet saved under its file name, its command line's overrides composed, the object loaded
from the config and exercised."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from align.config import compose

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"<!-- snippet: (\S+) -->\n```python\n(.*?)```\n\n    python -m align (.*?)\n", re.DOTALL)


@pytest.fixture
def snippets(tmp_path, monkeypatch) -> dict[str, list[str]]:
    """{file name: the overrides of its command line}, every file written into the cwd."""
    found = SNIPPET.findall(README.read_text())
    monkeypatch.chdir(tmp_path)
    for name, code, _ in found:
        (tmp_path / name).write_text(code)
    return {name: shlex.split(command) for name, code, command in found}


def test_the_readme_has_three_short_examples(snippets):
    assert set(snippets) == {"my_rewards.py", "my_envs.py", "my_tools.py"}
    for name in snippets:
        assert len(Path(name).read_text().splitlines()) < 30


def test_own_reward(snippets):
    from rewards import get_reward

    cfg, _ = compose(snippets["my_rewards.py"])
    reward = get_reward(cfg.reward.name, **cfg.reward.options)
    assert reward(["p", "q", "r"], ["The end.", "and then", "Yes!"]) == [1.0, 0.0, 1.0]


def test_own_environment(snippets):
    from rewards.envs import get_env

    cfg, _ = compose(snippets["my_envs.py"])
    env = get_env(cfg.env.name, row={"prompt": "Count down."}, **cfg.env.options)
    assert env.step("3").observation == "Next."
    assert env.step("one").observation == "Say 2."
    assert env.step("2!").observation == "Next."
    last = env.step("1")
    assert last.done and last.reward == 1.0


def test_own_tool(snippets):
    from rewards.envs import get_env

    cfg, _ = compose(snippets["my_tools.py"])
    env = get_env(cfg.env.name, row={"prompt": "q", "ground_truth": "3"}, **cfg.env.options)
    assert [t["function"]["name"] for t in env.tools] == ["calculator", "word_count"]
    step = env.step('<tool_call>{"name": "word_count", "arguments": {"text": "one two three"}}</tool_call>')
    assert step.observation[0]["content"] == "3"
    assert env.step("#### 3").reward == 1.0
