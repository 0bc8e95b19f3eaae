"""Multi-turn episodes: the model talks with an environment (tools, a game) over several turns.

Token-in, token-out (as veRL's agent loop): a trajectory is the prompt's ids, then for each turn
the ids the engine generated, kept exactly as generated (never decoded and re-encoded), then the
environment's answer appended as the chat template renders it (tool or user messages, and the
next generation prompt). Model tokens carry loss mask 1 and the engine's log-probs; environment
tokens carry mask 0 (they condition the model's later turns but are not its actions).

    episodes = run_episodes(engine, tokenizer, rows, env_name="calculator", env_options={}, params=params,
                            max_turns=4, max_total_tokens=512, max_prompt_length=256)

Batching: every turn, the contexts of all episodes still running go to the engine in one
`generate` call (turns of different episodes interleave); an episode that is done leaves the
batch. An episode ends when its environment says done, after `max_turns` model turns, or when
the response side (model + environment tokens) reaches `max_total_tokens` (the last turn's
tokens are cut at the budget, finish reason "length"; an observation that does not fit ends it).

The environment's observation tokens: the template's render of the conversation with the
observation messages and a generation prompt, minus its render before them (found on a two-turn
probe conversation, so it works for any template that renders prefixes as prefixes), plus what
the template closes an assistant turn with beyond the stop token the model generated (Qwen's
"\\n" after <|im_end|>; the whole close when the turn was cut by length).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from rollout.base import SamplingParams

_PROBE_USER, _PROBE_ANSWER = "U", "A"


@dataclass
class Episode:
    """One trajectory. `ids`, `mask`, `logprobs` are the response side (everything after the
    prompt), aligned: mask 1 and the engine's log-prob on model tokens, 0 and 0.0 on environment tokens."""

    prompt_ids: list[int]
    group: int
    env: Any
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reward: float = 0.0
    turns: int = 0
    done: bool = False
    finish_reason: str = "stop"
    turn_texts: list[str] = field(default_factory=list)
    info: dict[str, float] = field(default_factory=dict)

    def add(self, ids: Sequence[int], logprobs: Sequence[float] | None) -> None:
        self.ids += list(ids)
        self.mask += [1 if logprobs is not None else 0] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


def render(tokenizer, messages: list[dict], tools: list[dict] | None, *, add_generation_prompt: bool) -> str:
    """The conversation through the tokenizer's chat template (our fallback when it has none),
    the tool schemas rendered by the template (`tools=`)."""
    from align.data.chat import FALLBACK_CHAT_TEMPLATE, has_chat_template

    template = None if has_chat_template(tokenizer) else FALLBACK_CHAT_TEMPLATE
    return tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, source: Any, tools: list[dict], max_prompt_length: int) -> list[int]:
    """The first prompt: the row's prompt (text: one user message; or messages) rendered with the
    tools and the generation prompt, left-truncated to `max_prompt_length`."""
    messages = [{"role": "user", "content": source}] if isinstance(source, str) else list(source)
    text = render(tokenizer, messages, tools, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=not _starts_with_bos(tokenizer, text))["input_ids"])
    return ids[-max_prompt_length:]


def _starts_with_bos(tokenizer, text: str) -> bool:
    bos = getattr(tokenizer, "bos_token", None)
    return bool(bos) and text.startswith(bos)


def observation_ids(tokenizer, observation: Any, tools: list[dict], last_token: int | None) -> list[int]:
    """Environment tokens after a model turn: the rest of the assistant turn's close, the
    observation's messages, and the next generation prompt (`last_token`: the turn's stop token,
    None when the turn was cut by length)."""
    messages = [{"role": "user", "content": observation}] if isinstance(observation, str) else list(observation)
    probe = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    closed = render(tokenizer, probe, tools, add_generation_prompt=False)
    full = render(tokenizer, probe + messages, tools, add_generation_prompt=True)
    if not full.startswith(closed):
        raise ValueError("chat template: rendering the conversation with the observation does not extend its render "
                         "without it, so the observation's tokens cannot be found")
    close = closed[closed.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):]  # e.g. "</s>" or "<|im_end|>\n"
    if last_token is not None:
        stop_text = tokenizer.decode([last_token])
        if stop_text and close.startswith(stop_text):
            close = close[len(stop_text):]
    return encode(tokenizer, close + full[len(closed):])


def run_episodes(engine, tokenizer, rows: Sequence[dict], groups: Sequence[int], *, env_name: str,
                 env_options: dict[str, Any], params: SamplingParams, max_turns: int, max_total_tokens: int,
                 max_prompt_length: int) -> list[Episode]:
    """`params.n` episodes per row (row-major: episode i * n + j is sample j of row i), run to the end.

    rows: data rows (`source` or `prompt`, `ground_truth`, `metadata`...), each given to its
    environment. Every turn samples with `params` (n=1 per running episode, the seed advanced per
    turn so turns do not repeat each other's noise)."""
    from rewards.envs import check_step, get_env

    episodes = []
    for row, group in zip(rows, groups):
        env_row = {**(row.get("metadata") or {}), **{k: v for k, v in row.items() if k != "prompt_ids"}}
        for _ in range(params.n):
            env = get_env(env_name, row=env_row, **env_options)
            source = row.get("source", row.get("prompt"))
            episodes.append(Episode(prompt_ids(tokenizer, source, env.tools, max_prompt_length), group, env))
    eos = set(getattr(engine, "eos_token_ids", []) or [tokenizer.eos_token_id])
    for turn in range(max_turns):
        running = [e for e in episodes if not e.done]
        if not running:
            break
        seed = None if params.seed is None else params.seed + 7919 * turn
        budget = max(e_left(e, max_total_tokens) for e in running)
        turn_params = SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                     max_new_tokens=min(params.max_new_tokens, budget), stop=params.stop,
                                     stop_token_ids=params.stop_token_ids, seed=seed)
        out = engine.generate([e.prompt_ids + e.ids for e in running], turn_params)
        for e, sample in zip(running, out.samples):
            ids, logprobs = sample.token_ids[: e_left(e, max_total_tokens)], sample.logprobs
            cut = len(ids) < len(sample.token_ids)
            e.add(ids, logprobs[: len(ids)])
            e.turns += 1
            e.turn_texts.append(sample.text)
            step = check_step(e.env.step(sample.text), env_name)
            e.reward += float(step.reward)
            for k, v in step.info.items():
                if isinstance(v, (int, float)):
                    e.info[k] = e.info.get(k, 0.0) + float(v)
            ended_by_length = cut or sample.finish_reason == "length"
            if step.done or e.turns >= max_turns or e_left(e, max_total_tokens) == 0:
                e.done, e.finish_reason = True, "length" if ended_by_length and not step.done else "stop"
                continue
            last = ids[-1] if ids and not ended_by_length and ids[-1] in eos else None
            obs = observation_ids(tokenizer, step.observation, e.env.tools, last)
            if len(obs) >= e_left(e, max_total_tokens):  # no room for the observation and a reply
                e.done, e.finish_reason = True, "length"
                continue
            e.add(obs, None)
    return episodes


def e_left(e: Episode, max_total_tokens: int) -> int:
    """Response-side tokens the episode may still add."""
    return max(0, max_total_tokens - len(e.ids))
