"""Hugging Face backend: batched, left-padded generation with the KV cache (the CPU default).

Sampling (greedy, temperature, top-k, top-p) runs in our own decode loop over the model's KV
cache rather than through `model.generate`, for three reasons: the log-prob of every sampled
token falls out of the same logits that chose it (no second pass, no processor bookkeeping); a
seed drives a private `torch.Generator`, so seeded calls are reproducible and never touch the
global RNG; and each row stops on its own stop token or stop string with its own finish reason.
Beam search (evaluation only) goes through `model.generate(num_beams=...)`, and the chosen beams'
raw log-probs are then recomputed by one forward pass. The loop can also report each step's tokens
as they are sampled (`generate(..., on_step=...)`, the optional feature of `rollout.base`), which
is how `align.serve` streams token by token.

Log-probs follow `rollout.base`: log_softmax of the logits each token was drawn from (after
temperature, top-k and top-p; raw when greedy), computed in fp32 whatever the model's dtype.
Sampling order: temperature, then top-k, then top-p (that of transformers and vLLM). Top-p keeps
the smallest set of most likely tokens whose probability mass reaches `top_p`.

Stops (vLLM's defaults, so both backends return the same samples): a row stops on the first
token in `eos_token_ids | params.stop_token_ids` (the token is kept in `token_ids`, its text is
left out of `text`), or when its decoded text first contains one of `params.stop` (`token_ids`
then end with the token that completed the stop string, and `text` ends just before the stop
string); finish reason "stop". Otherwise it runs to `max_new_tokens`, or until prompt + response
fill the model's context, with finish reason "length".

Determinism: with `params.seed` set, the same call (same prompts, params and `max_batch_size`)
returns identical samples; all rows of a call draw from one generator, so a row's sample depends
on the rest of its batch. With `seed=None` the global torch RNG is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
from typing import Any, Callable, ContextManager, Iterable, Sequence

import torch
from torch import nn

from rollout.base import RolloutOutput, RolloutSample, SamplingParams, first_stop
from rollout.fast_decode import LlamaDecoder

# Prompt tokens decoded in front of a response so its first token reads as it does in context.
_DECODE_CONTEXT = 4


class HFEngine:
    """A rollout engine over any Hugging Face causal LM (plain, peft, or a role of a shared model).

    model:          the causal LM (anything whose forward takes input_ids, attention_mask,
                    position_ids, past_key_values, use_cache and returns .logits and
                    .past_key_values; beam search also needs `.generate`).
    tokenizer:      decodes the responses' text.
    max_batch_size: rows (prompts x n) per forward; larger calls are split into chunks.
    eos_token_id:   id or ids that end a response; default the tokenizer's eos, else the model's.
    role:           optional zero-argument callable returning a context manager that yields the
                    module to generate with, e.g. `lambda: multihead.using("actor")`. The engine
                    then runs the trainer's own parameters, and `update_weights` is a no-op.
    fast_decode:    decode Llama-family models with `rollout.fast_decode.LlamaDecoder` (same
                    logits to float rounding, about 2x faster per step on CPU); other models, or
                    False, use the model's own forward for every step.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_batch_size: int = 64,
        eos_token_id: int | Iterable[int] | None = None,
        role: Callable[[], ContextManager[nn.Module]] | None = None,
        fast_decode: bool = True,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.role = role
        self.fast_decode = fast_decode
        self.eos_token_ids = _resolve_eos(eos_token_id, tokenizer, model)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        self._asleep = False

    # ---- the protocol ---------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        on_step: Callable[[list[int], list[int]], None] | None = None,
    ) -> RolloutOutput:
        """`params.n` responses per prompt, prompt-major: samples[i * n + j] is sample j of prompt i.

        on_step: called after each decode step as `on_step(rows, tokens)` with the token just
                 sampled for every row still running (rows index the prompt-major samples), so a
                 row's tokens over all calls are its `token_ids`. It runs in the decode loop, so
                 it should be quick (the server queues the tokens for another thread). Beam search
                 ignores it: its beams are only known at the end.
        """
        if self._asleep:
            raise RuntimeError("HFEngine.generate called while asleep; call wake_up() first")
        prompts = [[int(t) for t in p] for p in prompts]
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if params.num_beams > 1 and params.n > params.num_beams:
            raise ValueError(f"beam search returns at most num_beams={params.num_beams} sequences, asked n={params.n}")

        stop_ids = set(self.eos_token_ids) | set(params.stop_token_ids)
        rows = [p for p in prompts for _ in range(params.n)]  # prompt-major
        with self._module() as module, torch.inference_mode():
            budgets = _budgets(module, prompts, params.max_new_tokens)
            if params.num_beams > 1:
                responses = self._beam_search(module, prompts, budgets, params, stop_ids)
            else:
                row_budgets = [b for b in budgets for _ in range(params.n)]
                generator = _generator(params.seed, _device(module))
                responses = []
                for start in range(0, len(rows), self.max_batch_size):
                    chunk = slice(start, start + self.max_batch_size)
                    report = None if on_step is None else functools.partial(_report_rows, on_step, start)
                    responses += self._sample(module, rows[chunk], row_budgets[chunk], params, stop_ids, generator, report)

        samples = []
        for i, (token_ids, logprobs, reason) in enumerate(responses):
            # A stop token's own text is left out (vLLM does the same), special or not.
            on_stop_token = reason == "stop" and token_ids[-1] in stop_ids
            text = self.response_text(rows[i], token_ids[:-1] if on_stop_token else token_ids)
            cut = first_stop(text, params.stop)
            samples.append(
                RolloutSample(
                    prompt_index=i // params.n,
                    token_ids=token_ids,
                    text=text if cut is None else text[:cut],
                    logprobs=logprobs,
                    finish_reason=reason,
                )
            )
        return RolloutOutput(samples=samples, n=params.n)

    def update_weights(
        self, *, lora: dict[str, torch.Tensor] | None = None, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Copy new policy weights into the model in place.

        state_dict: a full (or partial) state dict of the model, by its own key names.
        lora:       adapter tensors in peft naming (`get_peft_model_state_dict`), loaded into the
                    model's active adapter; the model must be a peft model.
        With a `role` the engine runs the trainer's own parameters, so there is nothing to copy.
        """
        if lora is None and state_dict is None:
            raise ValueError("update_weights needs lora=... or state_dict=...")
        if self.role is not None:
            return
        if state_dict is not None:
            result = self.model.load_state_dict(state_dict, strict=False)
            if result.unexpected_keys:
                raise KeyError(f"state_dict keys not in the model: {result.unexpected_keys[:5]}")
        if lora is not None:
            from peft import PeftModel, set_peft_model_state_dict

            if not isinstance(self.model, PeftModel):
                raise TypeError("update_weights(lora=...) needs a peft model; pass state_dict= for a plain model")
            name = self.model.active_adapter
            result = set_peft_model_state_dict(self.model, lora, adapter_name=name)
            if result.unexpected_keys:
                raise KeyError(f"LoRA tensors not in adapter {name!r}: {result.unexpected_keys[:5]}")

    def sleep(self) -> None:
        """Free what generation holds. The KV cache lives only inside `generate`, so there is no pool
        to release on CPU; on GPU this returns the allocator's cached blocks to the device."""
        self._asleep = True
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        """Allow `generate` again (the cache is re-allocated on demand)."""
        self._asleep = False

    # ---- decoding -------------------------------------------------------------------------

    def _sample(
        self,
        module: nn.Module,
        rows: list[list[int]],
        budgets: list[int],
        params: SamplingParams,
        stop_ids: set[int],
        generator: torch.Generator | None,
        on_step: Callable[[list[int], list[int]], None] | None = None,
    ) -> list[tuple[list[int], list[float], str]]:
        """Decode one chunk of rows with the KV cache; returns (token_ids, logprobs, finish_reason)
        each. `on_step(rows, tokens)` gets each step's tokens of the rows still running (chunk rows)."""
        device = _device(module)
        # Prefill each distinct prompt once (the n samples of a prompt share it), then give every
        # row its prompt's keys, values and last logits.
        distinct: dict[tuple[int, ...], int] = {}
        row_prompt = torch.tensor([distinct.setdefault(tuple(r), len(distinct)) for r in rows], device=device)  # (B,)
        input_ids, attention_mask = _left_pad([list(p) for p in distinct], self.pad_token_id, device)  # (U, P)
        B = len(rows)
        budget = torch.tensor(budgets, device=device)  # (B,) new tokens each row may take
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (U, P): left padding shifts positions
        cache_kw = _cache_kwarg()
        out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                     logits_to_keep=1)
        cache, logits = out[cache_kw], out.logits[:, -1].float()  # (U, V)
        shared = len(distinct) < B
        if shared:
            logits, attention_mask, position_ids = logits[row_prompt], attention_mask[row_prompt], position_ids[row_prompt]
        total_length = attention_mask.shape[1] + int(budget.max())
        decoder = LlamaDecoder.build(module, total_length) if self.fast_decode else None
        if decoder is not None:  # the lean step takes over the cache (rollout.fast_decode)
            decoder.start(cache, attention_mask, row_prompt if shared else None, total_length)
            cache = out = None  # the prefill's cache is copied; free it
        elif shared:
            cache.batch_select_indices(row_prompt)
        next_position = position_ids[:, -1:] + 1  # (B, 1)

        done = torch.zeros(B, dtype=torch.bool, device=device)
        stopped = torch.zeros(B, dtype=torch.bool, device=device)
        lengths = torch.zeros(B, dtype=torch.long, device=device)
        tokens, logprobs = [], []  # each step: (B,)
        texts_ids: list[list[int]] = [[] for _ in range(B)]  # only filled when stop strings are set
        for _ in range(int(budget.max())):
            processed = _processed_logits(logits, params)  # (B, V): what the token is drawn from
            token = processed.argmax(-1) if params.greedy else _sample_categorical(processed.softmax(-1), generator)
            token = token.masked_fill(done, self.pad_token_id)
            if on_step is not None:
                running = (~done).nonzero().squeeze(-1)  # (R,) rows that take this token
                on_step(running.tolist(), token[running].tolist())
            tokens.append(token)
            logprobs.append(processed.log_softmax(-1).gather(-1, token[:, None]).squeeze(-1))
            lengths += (~done).long()

            hit = torch.isin(token, stop_tensor) & ~done
            if params.stop:
                hit |= self._hits_stop_string(rows, texts_ids, token, done, params.stop)
            stopped |= hit
            done |= hit | (lengths >= budget)
            if bool(done.all()):
                break

            if decoder is not None:
                logits = decoder.step(token, next_position[:, 0]).float()
                next_position = next_position + 1
                continue
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=-1)
            out = module(
                input_ids=token[:, None],
                attention_mask=attention_mask,
                position_ids=next_position,
                use_cache=True,
                **{cache_kw: cache},
            )
            cache, logits = out[cache_kw], out.logits[:, -1].float()
            next_position = next_position + 1
        del cache, decoder

        tokens_t = torch.stack(tokens, dim=1).tolist()  # (B, steps)
        logprobs_t = torch.stack(logprobs, dim=1).tolist()
        return [
            (tokens_t[i][:n], logprobs_t[i][:n], "stop" if s else "length")
            for i, (n, s) in enumerate(zip(lengths.tolist(), stopped.tolist()))
        ]

    def _hits_stop_string(self, rows, texts_ids, token, done, stops) -> torch.Tensor:
        """(B,) bool: rows whose decoded response first contains a stop string at this token."""
        hit = torch.zeros_like(done)
        for i, (t, d) in enumerate(zip(token.tolist(), done.tolist())):
            if d:
                continue
            texts_ids[i].append(t)
            if first_stop(self.response_text(rows[i], texts_ids[i]), stops) is not None:
                hit[i] = True
        return hit

    def response_text(self, prompt: list[int], ids: list[int]) -> str:
        """The response's text as it reads after its prompt: decoded behind the prompt's last few
        tokens, so a leading space survives (SentencePiece drops it at the start of a decode) and
        prompt text + response text is the text of the whole sequence, as with vLLM."""
        context = prompt[-_DECODE_CONTEXT:]
        head = self.tokenizer.decode(context, skip_special_tokens=True)
        whole = self.tokenizer.decode(context + ids, skip_special_tokens=True)
        if whole.startswith(head):
            return whole[len(head) :]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _beam_search(self, module, prompts, budgets, params, stop_ids) -> list[tuple[list[int], list[float], str]]:
        """Beam search through `module.generate`; the n best beams per prompt, cut at stops and
        re-scored with raw log-probs by one forward pass."""
        responses = []
        per_call = max(1, self.max_batch_size // params.num_beams)  # prompts x beams rows per forward
        for start in range(0, len(prompts), per_call):
            chunk = prompts[start : start + per_call]
            input_ids, attention_mask = _left_pad(chunk, self.pad_token_id, _device(module))
            P = input_ids.shape[1]
            out = module.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                num_beams=params.num_beams,
                num_return_sequences=params.n,
                max_new_tokens=min(budgets[start : start + per_call]),
                eos_token_id=sorted(stop_ids) or None,
                pad_token_id=self.pad_token_id,
                early_stopping=True,
                return_dict_in_generate=False,
                top_k=None,
                top_p=None,
                temperature=None,
            )  # (len(chunk) * n, P + new), prompt-major like our rows
            for k, seq in enumerate(out[:, P:].tolist()):
                responses.append(self._cut_at_stops(chunk[k // params.n], seq, stop_ids, params.stop))
        rows = [p for p in prompts for _ in range(params.n)]
        scores = self._score(module, rows, [r[0] for r in responses])
        return [(ids, lp, reason) for (ids, _, reason), lp in zip(responses, scores)]

    def _cut_at_stops(self, prompt: list[int], ids: list[int], stop_ids: set[int], stops: tuple[str, ...]):
        """Cut a finished sequence at its first stop token or stop string (the stopping token kept)."""
        reason = "length"
        for j, t in enumerate(ids):
            if t in stop_ids:
                ids, reason = ids[: j + 1], "stop"
                break
        if stops and first_stop(self.response_text(prompt, ids), stops) is not None:
            for j in range(len(ids)):
                if first_stop(self.response_text(prompt, ids[: j + 1]), stops) is not None:
                    ids, reason = ids[: j + 1], "stop"
                    break
        return ids, [], reason

    def _score(self, module, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        """Raw per-token log-probs of each response after its prompt, by one left-padded forward."""
        scores = []
        for start in range(0, len(prompts), self.max_batch_size):
            chunk = slice(start, start + self.max_batch_size)
            seqs = [p + r for p, r in zip(prompts[chunk], responses[chunk])]
            input_ids, attention_mask = _left_pad(seqs, self.pad_token_id, _device(module))  # (B, T)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            logits = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
            logp = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1)
            for row, r in zip(logp.tolist(), responses[chunk]):
                scores.append(row[len(row) - len(r) :] if r else [])
        return scores

    @contextlib.contextmanager
    def _module(self):
        """The module to run, in eval mode (no dropout, LoRA dropout included) for the call only."""
        with (self.role() if self.role is not None else contextlib.nullcontext(self.model)) as module:
            modes = [(m, m.training) for m in module.modules()]
            module.eval()
            try:
                yield module
            finally:
                for m, training in modes:
                    m.training = training


def _report_rows(on_step: Callable[[list[int], list[int]], None], start: int, rows: list[int], tokens: list[int]):
    """`on_step` with a chunk's row numbers shifted to the call's (the chunk starts at row `start`)."""
    on_step([start + r for r in rows], tokens)


def _budgets(module: nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
    """New tokens each prompt may take: max_new_tokens, capped so prompt + response fit the
    model's context (the trainer must be able to re-score the whole sequence)."""
    context = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    if context is None:
        return [max_new_tokens] * len(prompts)
    for i, p in enumerate(prompts):
        if len(p) >= context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {context}")
    return [min(max_new_tokens, context - len(p)) for p in prompts]


def _processed_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The logits (B, V) the next token is drawn from: raw when greedy, else divided by the
    temperature, then top-k, then top-p (dropped tokens at -inf). Their log_softmax is the
    log-prob `rollout.base` reports (vLLM's `processed_logprobs`)."""
    if params.greedy:
        return logits
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # (B, V): mass of strictly more likely tokens
        drop = mass_before >= params.top_p  # never drops the most likely token (mass_before 0)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def _sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of (B, V) probabilities by inverse CDF: the first token whose cumulative
    mass exceeds u * total, u ~ U[0, 1). Tokens of zero probability are never drawn. Same
    distribution as `torch.multinomial`, at a fraction of its cost on CPU for one draw per row."""
    cdf = probs.cumsum(-1)  # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, 1)
    return token.clamp_(max=probs.shape[-1] - 1).squeeze(-1)


def _left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask, each row right-aligned."""
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            input_ids[i, T - len(r) :] = torch.tensor(r)
            attention_mask[i, T - len(r) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


@functools.cache
def _cache_kwarg() -> str:
    """The KV cache's name in forward kwargs and outputs: `cache` from transformers ~5.2x on (the
    old name still works there, with a deprecation warning per process), else `past_key_values`."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _resolve_eos(eos_token_id, tokenizer, model) -> tuple[int, ...]:
    """The ids that end a response: the argument, else the tokenizer's eos, else the model's."""
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int):
        return (eos_token_id,)
    return tuple(int(t) for t in eos_token_id)
