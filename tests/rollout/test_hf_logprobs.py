"""The log-prob convention: the engine's per-token log-probs are those of the distribution each
token was drawn from (logits / temperature, then top-k / top-p; raw when greedy), and equal the
trainer's recomputation of the same sequences at the same temperature.

The trainer side is `align.core.logprobs.logprobs_from_logits` on one right-padded batch of
prompt + response (no KV cache, different padding, different batch shape): only the convention
is shared with the engine, not the code path.
"""

from __future__ import annotations

import torch

from align.core.logprobs import logprobs_from_logits
from rollout import HFEngine, SamplingParams

TEMPERATURE = 0.7


def trainer_logits(model, prompts, samples, pad_id):
    """Per-sample (L, V) logits scoring each response token: one right-padded forward, as a
    trainer runs it."""
    seqs = [prompts[s.prompt_index] + s.token_ids for s in samples]
    T = max(len(q) for q in seqs)
    input_ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, q in enumerate(seqs):
        input_ids[i, : len(q)] = torch.tensor(q)
        mask[i, : len(q)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
    out = []
    for i, s in enumerate(samples):
        P = len(prompts[s.prompt_index])
        out.append(logits[i, P - 1 : P - 1 + len(s.token_ids)])  # (L, V): position t scores token t + 1
    return out


def trainer_logprobs(model, prompts, samples, pad_id, temperature=1.0):
    """Per-sample response log-probs recomputed as a trainer does, at `temperature`."""
    return [logprobs_from_logits(x / temperature, torch.tensor(s.token_ids))
            for x, s in zip(trainer_logits(model, prompts, samples, pad_id), samples)]


def _worst(samples, recomputed) -> float:
    return max(float((torch.tensor(s.logprobs) - r).abs().max()) for s, r in zip(samples, recomputed))


def test_sampled_logprobs_equal_trainer_recompute_at_the_temperature(stories, prompts):
    """At temperature 0.7 the engine reports log_softmax(logits / 0.7) of each sampled token: equal
    to the trainer's recomputation at 0.7 within 1e-4, and clearly not the raw (T = 1) log-probs."""
    model, tok = stories
    params = SamplingParams(n=4, temperature=TEMPERATURE, max_new_tokens=24, seed=11)
    out = HFEngine(model, tok).generate(prompts, params)
    assert _worst(out.samples, trainer_logprobs(model, prompts, out.samples, tok.pad_token_id, TEMPERATURE)) < 1e-4
    assert _worst(out.samples, trainer_logprobs(model, prompts, out.samples, tok.pad_token_id)) > 1e-2


def test_greedy_logprobs_are_raw_and_top_k_top_p_renormalise(tiny, stories, prompts):
    """Greedy: raw log_softmax(logits). Top-k 5 at T = 1.5: log_softmax over the 5 kept logits / 1.5
    (the distribution sampled from). Top-p 0.8 at T = 0.7: over the nucleus of softmax(logits / 0.7)."""
    _, tok = stories
    engine = HFEngine(tiny, tok, eos_token_id=[])
    out = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=16))
    assert _worst(out.samples, trainer_logprobs(tiny, prompts, out.samples, tok.pad_token_id)) < 1e-4

    def top_k(x, T, k=5):
        x = x / T
        return x.masked_fill(x < x.topk(k, dim=-1).values[:, -1:], float("-inf"))

    def top_p(x, T, p=0.8):
        x = x / T
        probs = x.softmax(-1)
        keep = torch.zeros_like(x, dtype=torch.bool)
        for i in range(len(x)):  # the smallest most-likely set whose mass reaches p, row by row
            order = probs[i].argsort(descending=True)
            n = int((probs[i][order].cumsum(0) < p).sum()) + 1
            keep[i, order[:n]] = True
        return x.masked_fill(~keep, float("-inf"))

    for params, process in (
        (SamplingParams(n=2, temperature=1.5, top_k=5, max_new_tokens=16, seed=1), lambda x: top_k(x, 1.5)),
        (SamplingParams(n=2, temperature=0.7, top_p=0.8, max_new_tokens=16, seed=2), lambda x: top_p(x, 0.7)),
    ):
        out = engine.generate(prompts, params)
        expected = [process(x).log_softmax(-1).gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
                    for x, s in zip(trainer_logits(tiny, prompts, out.samples, tok.pad_token_id), out.samples)]
        assert _worst(out.samples, expected) < 1e-4
