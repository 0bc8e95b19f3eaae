"""Row formats: parse a raw `Row` into a typed example, or raise `DataError` naming the field.

| format          | reads (default column names)                       | gives          |
| --------------- | -------------------------------------------------- | -------------- |
| `alpaca`        | instruction, input (optional), output              | SFTExample     |
| `chat`          | messages: [{role, content}] (or ShareGPT's list)   | ChatExample    |
| `sharegpt`      | conversations: [{from, value}] (or `messages`)     | ChatExample    |
| `pairwise`      | prompt, chosen, rejected (strings or message lists)| PairExample    |
| `hh`            | chosen, rejected: whole HH-RLHF dialogues          | PairExample    |
| `kto`           | prompt, completion, label (bool, or 0/1)           | KTOExample     |
| `prompt_answer` | question, answer (GSM8K: final answer after ####)  | PromptExample  |
| `prompt`        | prompt                                             | PromptExample  |

`columns` maps a format's logical names to the row's keys, e.g. `{"prompt": "question"}`;
unknown logical names are an error (a typo should not silently fall back to the default).

A prompt or response is either a string or a list of chat messages `{"role", "content"}`.
Message lists are rendered with the tokenizer's chat template at tokenization time
(`align.data.chat`), because rendering needs the tokenizer. In `pairwise` and `kto`, if any of
the fields is a message list, all become message lists: a string prompt becomes one user
message, a string response one assistant message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from align.data.errors import DataError
from align.data.sources import Row

Message = dict[str, str]
Text = Union[str, list[Message]]  # a plain string, or chat messages to render with a template

HH_ASSISTANT = "\n\nAssistant:"
ANSWER_DELIMITER = "####"
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}

# The Stanford Alpaca prompt (https://github.com/tatsu-lab/stanford_alpaca, train.py).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class SFTExample:
    """A prompt and the response to learn (loss on the response only)."""

    prompt: str
    response: str


@dataclass(frozen=True)
class ChatExample:
    """A conversation; SFT puts the loss on every assistant turn."""

    messages: list[Message]


@dataclass(frozen=True)
class PairExample:
    """A preference pair: the shared prompt, the preferred and the dispreferred response."""

    prompt: Text
    chosen: Text
    rejected: Text


@dataclass(frozen=True)
class KTOExample:
    """An unpaired judgement: `label` is True when `completion` is desirable."""

    prompt: Text
    completion: Text
    label: bool


@dataclass(frozen=True)
class PromptExample:
    """An RL prompt, with the reference answer a rule reward checks against (None if none)."""

    prompt: Text
    ground_truth: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


Example = Union[SFTExample, ChatExample, PairExample, KTOExample, PromptExample]


@dataclass(frozen=True)
class Format:
    name: str
    parse: Callable[[Row, Mapping[str, str]], Example]
    columns: Mapping[str, str]  # logical name -> default row key


# ---- field access -------------------------------------------------------------------------


def _bad(row: Row, key: str | None, problem: str, reason: str) -> DataError:
    return DataError(row.origin, row.line, key, problem, reason)


def _present(row: Row, key: str) -> bool:
    return row.data.get(key) is not None


def _get(row: Row, key: str) -> Any:
    value = row.data.get(key)
    if value is None:
        raise _bad(row, key, "missing", "missing_field")
    return value


def _str(row: Row, key: str) -> str:
    value = row.data.get(key)
    _check_str(row, key, value)
    return value


def _check_str(row: Row, key: str, value: Any) -> None:
    if value is None:
        raise _bad(row, key, "missing", "missing_field")
    if not isinstance(value, str):
        raise _bad(row, key, f"expected a string, got {type(value).__name__}", "wrong_type")


def _messages(row: Row, key: str, value: Any) -> list[Message]:
    """Validate a message list; ShareGPT's {from, value} turns become {role, content}."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type(value).__name__
        raise _bad(row, key, f"expected a non-empty list of messages, got {got}", "wrong_type")
    out = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, Mapping):
            raise _bad(row, where, f"expected a message object, got {type(m).__name__}", "wrong_type")
        if "from" in m and "role" not in m:
            role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
            if role is None:
                raise _bad(row, f"{where}.from", f"unknown speaker {m['from']!r}; known: {sorted(SHAREGPT_ROLES)}", "wrong_type")
            content_key = "value"
        else:
            role, content_key = m.get("role"), "content"
            _check_str(row, f"{where}.role", role)
        content = m.get(content_key)
        _check_str(row, f"{where}.{content_key}", content)
        out.append({"role": role, "content": content})
    return out


def _text(row: Row, key: str) -> Text:
    value = _get(row, key)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(row, key, value)
    raise _bad(row, key, f"expected a string or a list of messages, got {type(value).__name__}", "wrong_type")


def _as_messages(text: Text, role: str) -> list[Message]:
    return [{"role": role, "content": text}] if isinstance(text, str) else text


def unify(prompt: Text, *responses: Text) -> tuple[Text, ...]:
    """All strings stay strings; if any field is a message list, all become message lists."""
    if all(isinstance(t, str) for t in (prompt, *responses)):
        return (prompt, *responses)
    return (_as_messages(prompt, "user"), *(_as_messages(r, "assistant") for r in responses))


# ---- parsers ------------------------------------------------------------------------------


def parse_alpaca(row: Row, cols: Mapping[str, str]) -> SFTExample:
    instruction, output = _str(row, cols["instruction"]), _str(row, cols["output"])
    extra = row.data.get(cols["input"]) or ""
    if not isinstance(extra, str):
        raise _bad(row, cols["input"], f"expected a string, got {type(extra).__name__}", "wrong_type")
    if extra.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=extra)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    return SFTExample(prompt, output)


def parse_chat(row: Row, cols: Mapping[str, str]) -> ChatExample:
    key = cols["messages"]
    if not _present(row, key):  # chat and ShareGPT files use either name
        key = next((k for k in ("messages", "conversations") if _present(row, k)), key)
    messages = _messages(row, key, _get(row, key))
    if not any(m["role"] == "assistant" for m in messages):
        raise _bad(row, key, "no assistant turn to learn from", "no_assistant_turn")
    return ChatExample(messages)


def parse_pairwise(row: Row, cols: Mapping[str, str]) -> PairExample:
    chosen, rejected = _text(row, cols["chosen"]), _text(row, cols["rejected"])
    if _present(row, cols["prompt"]):
        prompt = _text(row, cols["prompt"])
    elif isinstance(chosen, list) and isinstance(rejected, list):
        # Implicit prompt: two whole conversations that differ only in their final message.
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise _bad(row, cols["rejected"], f"no {cols['prompt']!r} field, and the conversation does not "
                       f"share all but its last message with {cols['chosen']!r}", "pair_prefix_mismatch")
        chosen, rejected = chosen[-1:], rejected[-1:]
    else:
        hint = "; for whole HH-RLHF dialogues use format 'hh'" if isinstance(chosen, str) else ""
        raise _bad(row, cols["prompt"], "missing" + hint, "missing_field")
    return PairExample(*unify(prompt, chosen, rejected))


def parse_hh(row: Row, cols: Mapping[str, str]) -> PairExample:
    """Split two whole HH-RLHF dialogues into the shared prompt and the two final responses.

    The prompt is everything up to and including the last "\\n\\nAssistant:" marker of the
    chosen dialogue (so `prompt + chosen == row["chosen"]` exactly, leading space included); the
    rejected dialogue must have the same text up to its own last marker, or the row is bad.
    """
    ck, rk = cols["chosen"], cols["rejected"]
    chosen, rejected = _str(row, ck), _str(row, rk)
    i, j = chosen.rfind(HH_ASSISTANT), rejected.rfind(HH_ASSISTANT)
    if i < 0:
        raise _bad(row, ck, f"no {HH_ASSISTANT!r} turn in the dialogue", "hh_no_assistant_turn")
    if j < 0:
        raise _bad(row, rk, f"no {HH_ASSISTANT!r} turn in the dialogue", "hh_no_assistant_turn")
    cut_c, cut_r = i + len(HH_ASSISTANT), j + len(HH_ASSISTANT)
    if chosen[:cut_c] != rejected[:cut_r]:
        raise _bad(row, rk, f"does not share the dialogue with {ck!r} up to the last Assistant turn",
                   "hh_prefix_mismatch")
    return PairExample(chosen[:cut_c], chosen[cut_c:], rejected[cut_r:])


def parse_kto(row: Row, cols: Mapping[str, str]) -> KTOExample:
    prompt, completion = _text(row, cols["prompt"]), _text(row, cols["completion"])
    label = _get(row, cols["label"])
    if isinstance(label, int) and label in (0, 1):  # bool is an int too
        label = bool(label)
    else:
        raise _bad(row, cols["label"], f"expected a bool (or 0/1), got {label!r}", "wrong_type")
    prompt, completion = unify(prompt, completion)
    return KTOExample(prompt, completion, label)


def parse_prompt_answer(row: Row, cols: Mapping[str, str]) -> PromptExample:
    """GSM8K style: the ground truth is the text after the last '####' of the answer, stripped
    (the whole answer when it has no '####'); the full solution is kept in metadata."""
    prompt = _text(row, cols["prompt"])
    answer = _get(row, cols["answer"])
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise _bad(row, cols["answer"], f"expected a string, got {type(answer).__name__}", "wrong_type")
    truth = answer.rsplit(ANSWER_DELIMITER, 1)[-1].strip()
    if not truth:
        raise _bad(row, cols["answer"], "empty final answer", "empty_answer")
    return PromptExample(prompt, truth, {"solution": answer})


def parse_prompt(row: Row, cols: Mapping[str, str]) -> PromptExample:
    return PromptExample(_text(row, cols["prompt"]))


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("alpaca", parse_alpaca, {"instruction": "instruction", "input": "input", "output": "output"}),
        Format("chat", parse_chat, {"messages": "messages"}),
        Format("sharegpt", parse_chat, {"messages": "conversations"}),
        Format("pairwise", parse_pairwise, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}),
        Format("hh", parse_hh, {"chosen": "chosen", "rejected": "rejected"}),
        Format("kto", parse_kto, {"prompt": "prompt", "completion": "completion", "label": "label"}),
        Format("prompt_answer", parse_prompt_answer, {"prompt": "question", "answer": "answer"}),
        Format("prompt", parse_prompt, {"prompt": "prompt"}),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown data format {name!r}; valid: {sorted(FORMATS)}") from None


def resolve_columns(fmt: Format, columns: Mapping[str, str] | None) -> dict[str, str]:
    """The format's default column names, overridden by `columns` (logical name -> row key)."""
    unknown = set(columns or ()) - set(fmt.columns)
    if unknown:
        raise ValueError(f"format {fmt.name!r} has no column(s) {sorted(unknown)}; its columns: {sorted(fmt.columns)}")
    return {**fmt.columns, **(columns or {})}


def parse_row(row: Row, format: str | Format, columns: Mapping[str, str] | None = None) -> Example:
    """Parse one row (convenience for a single call; `load_examples` resolves once per source)."""
    fmt = format if isinstance(format, Format) else get_format(format)
    return fmt.parse(row, resolve_columns(fmt, columns))
