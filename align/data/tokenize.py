"""Typed examples -> token ids, with prompt-token loss masks and counted truncation.

How text becomes ids (the choice every trainer relies on):

- The prompt and each response are tokenized *separately* and concatenated, so the boundary
  between prompt and response tokens is exact and the prompt ids are the same ids a sampler
  sees when it is given the prompt alone (as PPO/GRPO rollouts are).
- The prompt starts with the tokenizer's BOS when the tokenizer adds one by itself
  (stories260K/Llama do, GPT-NeoX does not); never twice (a chat template may write it).
- A response is tokenized as a *continuation*: `ids("\\n" + text)` minus `ids("\\n")`. A plain
  `ids(text)` is wrong for SentencePiece tokenizers, which treat the start of every call as the
  start of a word: after the Alpaca prompt's "### Response:\\n", "The" would become "▁The" and
  decode as " The". When the anchor's ids are not a prefix (the anchor merged with the text),
  plain `ids(text)` is used. A response after an empty prompt is tokenized plainly.
- Plain-text responses get EOS appended (`add_eos`); a response rendered by a chat template
  already ends with whatever the template closes a turn with (EOS in the fallback template).

Lengths: `max_length` bounds prompt + response (for pairs: prompt + the longer response).
Responses longer than `max_response_length` are cut on the right (EOS included) and counted.
A prompt that does not fit is left-truncated (its BOS kept, its end kept: the end is what the
response answers) with `overlong="truncate_left"`, or the example is dropped with
`overlong="drop"`; a response that cannot fit even after an empty prompt is always dropped.
Every truncation and drop is counted in `DataStats`.

Outputs are lists of Python ints; `align.data.collate` pads them into tensors. Labels follow
the Hugging Face convention: aligned with `input_ids` (the model shifts), -100 where no loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from align.data.chat import chat_segments, render_chat, render_prompt_completion
from align.data.errors import DataStats
from align.data.formats import ChatExample, Example, KTOExample, PairExample, PromptExample, SFTExample, Text, unify

IGNORE_INDEX = -100
OVERLONG = ("truncate_left", "drop")
_ANCHOR = "\n"
_CHUNK = 512  # examples per batched tokenizer call


class Encoder:
    """Batched text -> ids in three modes: "start" (a sequence's beginning: BOS if the tokenizer
    adds one), "cont" (a continuation of earlier text), "plain" (ids of the text, nothing added)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        probe = tokenizer("a")["input_ids"]
        self.bos = [bos] if bos is not None and probe[:1] == [bos] else []
        self.eos = tokenizer.eos_token_id
        self._anchor = self._ids([_ANCHOR])[0]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return list(self.tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else []

    def encode(self, pieces: Sequence[tuple[str, str]]) -> list[list[int]]:
        """ids for each (text, mode) piece, one tokenizer call per mode."""
        out: list[list[int] | None] = [None] * len(pieces)
        by_mode: dict[str, list[int]] = {"start": [], "cont": [], "plain": []}
        for i, (_, mode) in enumerate(pieces):
            by_mode[mode].append(i)
        retry = []
        for i, ids in zip(by_mode["cont"], self._ids([_ANCHOR + pieces[i][0] for i in by_mode["cont"]])):
            n = len(self._anchor)
            if ids[:n] == self._anchor:
                out[i] = ids[n:]
            else:  # the anchor merged with the text's first characters
                retry.append(i)
        plain = by_mode["plain"] + retry
        for i, ids in zip(plain, self._ids([pieces[i][0] for i in plain])):
            out[i] = ids
        for i, ids in zip(by_mode["start"], self._ids([pieces[i][0] for i in by_mode["start"]])):
            out[i] = ids if ids[:1] == self.bos else self.bos + ids
        return out  # type: ignore[return-value]

    def with_eos(self, ids: list[int], add: bool) -> list[int]:
        if add and self.eos is not None and ids[-1:] != [self.eos]:
            return ids + [self.eos]
        return ids


# ---- public API ---------------------------------------------------------------------------


def tokenize_sft(
    examples: Iterable[Example],
    tokenizer,
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    overlong: str = "truncate_left",
    add_eos: bool = True,
    stats: DataStats | None = None,
) -> list[dict[str, list[int]]]:
    """SFT sequences: `{"input_ids", "labels"}`, labels = -100 on prompt tokens (and BOS).

    Accepts SFTExample, ChatExample (loss on every assistant turn; the whole conversation must
    fit `max_length`, and left truncation may cut into early turns but never the final
    assistant turn), PairExample (learns `chosen`) and PromptExample with a
    `metadata["solution"]` (GSM8K: learns the worked solution).
    """
    _check_overlong(overlong)
    stats = stats if stats is not None else DataStats()
    enc, out = Encoder(tokenizer), []
    for chunk in _chunks(examples):
        plans = [_sft_plan(ex, tokenizer, add_eos) for ex in chunk]
        for plan, ids in zip(plans, _encode_plans(enc, plans)):
            if plan.trainable is not None:
                item = _fit_chat(enc, ids, plan.trainable, max_length, overlong, stats)
            else:
                item = _fit_single(enc, ids[0], enc.with_eos(ids[1], plan.add_eos), max_length,
                                   max_prompt_length, max_response_length, overlong, stats)
                if item is not None:
                    p, r = item
                    item = {"input_ids": p + r, "labels": [IGNORE_INDEX] * len(p) + r}
            if item is not None:
                out.append(item)
    stats.examples_tokenized += len(out)
    return out


def tokenize_pairs(
    examples: Iterable[PairExample],
    tokenizer,
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    overlong: str = "truncate_left",
    add_eos: bool = True,
    stats: DataStats | None = None,
) -> list[dict[str, list[int]]]:
    """Preference pairs: `{"prompt_ids", "chosen_ids", "rejected_ids"}`; the prompt is cut so
    that prompt + the longer response fits `max_length`."""
    _check_overlong(overlong)
    stats = stats if stats is not None else DataStats()
    enc, out = Encoder(tokenizer), []
    for chunk in _chunks(examples):
        plans = [_plan(ex.prompt, [ex.chosen, ex.rejected], tokenizer, add_eos) for ex in chunk]
        for plan, ids in zip(plans, _encode_plans(enc, plans)):
            fitted = _fit(enc, ids[0], [enc.with_eos(r, plan.add_eos) for r in ids[1:]], max_length,
                          max_prompt_length, max_response_length, overlong, stats)
            if fitted is not None:
                p, (c, r) = fitted
                out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    stats.examples_tokenized += len(out)
    return out


def tokenize_kto(
    examples: Iterable[KTOExample],
    tokenizer,
    max_length: int,
    *,
    max_prompt_length: int | None = None,
    max_response_length: int | None = None,
    overlong: str = "truncate_left",
    add_eos: bool = True,
    stats: DataStats | None = None,
) -> list[dict[str, Any]]:
    """Unpaired examples: `{"prompt_ids", "completion_ids", "label"}` (label: bool)."""
    _check_overlong(overlong)
    stats = stats if stats is not None else DataStats()
    enc, out = Encoder(tokenizer), []
    for chunk in _chunks(examples):
        plans = [_plan(ex.prompt, [ex.completion], tokenizer, add_eos) for ex in chunk]
        for ex, plan, ids in zip(chunk, plans, _encode_plans(enc, plans)):
            item = _fit_single(enc, ids[0], enc.with_eos(ids[1], plan.add_eos), max_length,
                               max_prompt_length, max_response_length, overlong, stats)
            if item is not None:
                out.append({"prompt_ids": item[0], "completion_ids": item[1], "label": bool(ex.label)})
    stats.examples_tokenized += len(out)
    return out


def tokenize_prompts(
    examples: Iterable[Any],
    tokenizer,
    max_prompt_length: int,
    *,
    overlong: str = "truncate_left",
    stats: DataStats | None = None,
) -> list[dict[str, Any]]:
    """RL prompts: `{"prompt_ids", "prompt", "source", "ground_truth", "metadata"}`.

    Takes anything with a `.prompt` (PromptExample, PairExample, ...) or plain strings; message
    prompts are rendered with the generation prompt. `prompt` is the full rendered text (before
    any truncation); `source` the prompt as given (text or messages, what a reward model with its
    own chat template renders); `prompt_ids` are left-truncated to `max_prompt_length`, BOS kept.
    """
    _check_overlong(overlong)
    stats = stats if stats is not None else DataStats()
    enc, out = Encoder(tokenizer), []
    for chunk in _chunks(examples):
        texts = [_prompt_text(getattr(ex, "prompt", ex), tokenizer) for ex in chunk]
        for ex, text, ids in zip(chunk, texts, enc.encode([(t, "start") for t in texts])):
            ids = _fit_prompt(enc, ids, max_prompt_length, overlong, stats)
            if ids is not None:
                out.append({"prompt_ids": ids, "prompt": text, "source": getattr(ex, "prompt", ex),
                            "ground_truth": getattr(ex, "ground_truth", None),
                            "metadata": dict(getattr(ex, "metadata", {}) or {})})
    stats.examples_tokenized += len(out)
    return out


def as_sft(example: Example) -> SFTExample | ChatExample:
    """The supervised target an example offers (see `tokenize_sft`); TypeError if none."""
    if isinstance(example, (SFTExample, ChatExample)):
        return example
    if isinstance(example, PairExample):
        return SFTExample(example.prompt, example.chosen)
    if isinstance(example, PromptExample) and isinstance(example.metadata.get("solution"), str):
        return SFTExample(example.prompt, example.metadata["solution"])
    raise TypeError(f"no SFT target in {type(example).__name__} (need a response, a chosen reply or a solution)")


# ---- planning: examples -> (text, mode) pieces -----------------------------------------------


@dataclass
class _Plan:
    pieces: list[tuple[str, str]]  # (text, Encoder mode): the prompt first, then responses or turns
    add_eos: bool  # False after a chat template, which closes the turn itself
    trainable: list[bool] | None = None  # chat SFT: which pieces are assistant turns


def _plan(prompt: Text, responses: list[Text], tokenizer, add_eos: bool) -> _Plan:
    """Pieces [prompt, response, ...]: alternative responses to one prompt."""
    prompt, *responses = unify(prompt, *responses)
    if isinstance(prompt, str):
        mode = "cont" if prompt else "plain"
        return _Plan([(prompt, "start")] + [(r, mode) for r in responses], add_eos)
    texts = [render_prompt_completion(prompt, r, tokenizer) for r in responses]
    prompt_text = texts[0][0]
    mode = "cont" if prompt_text else "plain"
    return _Plan([(prompt_text, "start")] + [(c, mode) for _, c in texts], False)


def _sft_plan(example: Example, tokenizer, add_eos: bool) -> _Plan:
    example = as_sft(example)
    if not isinstance(example, ChatExample):
        return _plan(example.prompt, [example.response], tokenizer, add_eos)
    segments = chat_segments(example.messages, tokenizer)
    if not any(train for _, train in segments):
        raise ValueError(f"chat example has no assistant turn to learn: {example.messages!r}")
    pieces = [(text, "start" if i == 0 else "cont") for i, (text, _) in enumerate(segments)]
    return _Plan(pieces, False, [train for _, train in segments])


def _encode_plans(enc: Encoder, plans: list[_Plan]) -> list[list[list[int]]]:
    """ids per piece per plan, with one batched tokenizer call per mode for all plans."""
    ids, out, k = enc.encode([piece for plan in plans for piece in plan.pieces]), [], 0
    for plan in plans:
        out.append(ids[k : k + len(plan.pieces)])
        k += len(plan.pieces)
    return out


def _prompt_text(prompt: Text, tokenizer) -> str:
    return prompt if isinstance(prompt, str) else render_chat(prompt, tokenizer, add_generation_prompt=True)


def _chunks(examples: Iterable[Any]):
    chunk = []
    for ex in examples:
        chunk.append(ex)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- fitting to length --------------------------------------------------------------------


def _check_overlong(overlong: str) -> None:
    if overlong not in OVERLONG:
        raise ValueError(f"overlong must be one of {OVERLONG}, got {overlong!r}")


def _fit_prompt(enc: Encoder, ids: list[int], budget: int, overlong: str, stats: DataStats) -> list[int] | None:
    """`ids` if they fit `budget`, else BOS + their last tokens (or None: dropped, counted)."""
    if len(ids) <= budget:
        return ids
    n_bos = len(enc.bos) if ids[: len(enc.bos)] == enc.bos else 0
    if overlong == "drop" or budget <= n_bos:
        stats.examples_dropped_overlong += 1
        return None
    stats.prompts_truncated += 1
    return ids[:n_bos] + ids[len(ids) - (budget - n_bos):]


def _fit(enc, prompt, responses, max_length, max_prompt_length, max_response_length, overlong, stats):
    if max_response_length is not None:
        cut = [r[:max_response_length] for r in responses]
        stats.responses_truncated += sum(len(r) > max_response_length for r in responses)
        responses = cut
    budget = max_length - max(len(r) for r in responses)
    if max_prompt_length is not None:
        budget = min(budget, max_prompt_length)
    prompt = _fit_prompt(enc, prompt, budget, overlong, stats)
    return None if prompt is None else (prompt, responses)


def _fit_single(enc, prompt, response, max_length, max_prompt_length, max_response_length, overlong, stats):
    fitted = _fit(enc, prompt, [response], max_length, max_prompt_length, max_response_length, overlong, stats)
    return None if fitted is None else (fitted[0], fitted[1][0])


def _fit_chat(enc, seg_ids, trainable, max_length, overlong, stats):
    ids, labels = [], []
    for seg, train in zip(seg_ids, trainable):
        ids += seg
        labels += seg if train else [IGNORE_INDEX] * len(seg)
    n_bos = len(enc.bos) if ids[: len(enc.bos)] == enc.bos else 0
    labels[:n_bos] = [IGNORE_INDEX] * n_bos
    if len(ids) > max_length:
        last = max(i for i, t in enumerate(trainable) if t)
        keep = sum(len(s) for s in seg_ids[last:])  # the final assistant turn and what follows
        if overlong == "drop" or keep > max_length - n_bos:
            stats.examples_dropped_overlong += 1
            return None
        stats.prompts_truncated += 1
        tail = len(ids) - (max_length - n_bos)
        ids, labels = ids[:n_bos] + ids[tail:], labels[:n_bos] + labels[tail:]
    return {"input_ids": ids, "labels": labels}
