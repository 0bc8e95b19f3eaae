"""Rendering chat messages to text, and finding which characters are assistant turns.

A tokenizer's own `chat_template` is used when it has one. Otherwise `FALLBACK_CHAT_TEMPLATE`:

    <|system|>\\n{content}\\n<|user|>\\n{content}\\n<|assistant|>\\n{content}{eos}<|user|>\\n...

each non-assistant turn ends with a newline, each assistant turn with the EOS token (so the
model learns to stop), and the generation prompt is `<|assistant|>\\n`. (The newline is written
`{{ '\\n' }}`: Hugging Face renders with `trim_blocks`, which eats a newline after a block tag.)
It is a Jinja string like any Hugging Face template, so a trained model can be saved with
`tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE` and served with the format it learned.

Assistant spans are found by rendering prefixes of the conversation: the assistant turn `i`
occupies `render(messages[:i+1])` minus `render(messages[:i], add_generation_prompt=True)`.
That works for any template whose renders of a prefix are a prefix of the whole render; for a
template that rewrites earlier turns (some drop old reasoning) only the final assistant turn
is used, and a template where even that fails is an error.
"""

from __future__ import annotations

import logging

from align.data.formats import Message

logger = logging.getLogger("align.data")

FALLBACK_CHAT_TEMPLATE = (
    # tool schemas (`apply_chat_template(..., tools=...)`), one JSON line each, before the conversation
    "{% if tools %}<|tools|>\n{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token or '' }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(messages: list[Message], tokenizer, *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, with the tokenizer's template or the fallback."""
    template = None if has_chat_template(tokenizer) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def render_prompt_completion(prompt: list[Message], completion: list[Message], tokenizer) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, completion text) whose concatenation is
    the render of the whole conversation."""
    prompt_text = render_chat(prompt, tokenizer, add_generation_prompt=True)
    full = render_chat(prompt + completion, tokenizer)
    if not full.startswith(prompt_text):
        raise ValueError(
            "chat template: the rendered prompt (with generation prompt) is not a prefix of the "
            f"rendered conversation, so the completion cannot be separated:\n{prompt_text!r}\nvs\n{full!r}"
        )
    return prompt_text, full[len(prompt_text):]


def chat_segments(messages: list[Message], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_turn) pieces, in order.

    `"".join(text for text, _ in segments) == render_chat(messages, tokenizer)`. An assistant
    piece is the assistant's content plus whatever the template closes the turn with (EOS,
    `<|im_end|>\\n`, ...), so the loss teaches the model to end its turn.
    """
    full = render_chat(messages, tokenizer)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    spans = _assistant_spans(messages, turns, full, tokenizer)
    if spans is None:
        spans = _assistant_spans(messages, turns[-1:], full, tokenizer)
        if spans is None:
            raise ValueError("chat template: cannot locate the final assistant turn in the rendered "
                             "conversation (rendering a prefix is not a prefix of the whole)")
        logger.warning("chat template rewrites earlier turns; the loss covers the final assistant turn only")
    segments, pos = [], 0
    for start, end in spans:
        if start > pos:
            segments.append((full[pos:start], False))
        segments.append((full[start:end], True))
        pos = end
    if pos < len(full):
        segments.append((full[pos:], False))
    return segments


def _assistant_spans(messages, turns, full, tokenizer) -> list[tuple[int, int]] | None:
    spans, pos = [], 0
    for i in turns:
        before = _render_before(messages, i, tokenizer)
        through = render_chat(messages[: i + 1], tokenizer)
        if not (full.startswith(before) and full.startswith(through)) or len(before) < pos:
            return None
        spans.append((len(before), len(through)))
        pos = len(through)
    return spans


def _render_before(messages, i, tokenizer) -> str:
    """Everything the template writes before assistant turn `i`, generation prompt included."""
    try:
        return render_chat(messages[:i], tokenizer, add_generation_prompt=True)
    except Exception:
        if i == 0:  # some templates cannot render an empty conversation
            return ""
        raise
