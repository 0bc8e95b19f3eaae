"""The log-prob convention: the engine's per-token log-probs are RAW, log_softmax(logits) before
temperature / top-k / top-p, and equal the trainer's recomputation of the same sequences.

The trainer side is `align.core.logprobs.logprobs_from_logits` on one right-padded batch of
prompt + response (no KV cache, different padding, different batch shape): only the convention
is shared with the engine, not the code path.
"""

from __future__ import annotations

import torch

from align.core.logprobs import logprobs_from_logits
from rollout import HFEngine, SamplingParams

TEMPERATURE = 0.7


def trainer_logprobs(model, prompts, samples, pad_id, temperature=1.0):
    """Per-sample response log-probs recomputed as a trainer does: one right-padded forward."""
    seqs = [prompts[s.prompt_index] + s.token_ids for s in samples]
    T = max(len(q) for q in seqs)
    input_ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, q in enumerate(seqs):
        input_ids[i, : len(q)] = torch.tensor(q)
        mask[i, : len(q)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits  # (B, T, V)
    logp = logprobs_from_logits(logits[:, :-1] / temperature, input_ids[:, 1:])  # (B, T-1): scores t+1
    out = []
    for i, s in enumerate(samples):
        P = len(prompts[s.prompt_index])
        out.append(logp[i, P - 1 : P - 1 + len(s.token_ids)])
    return out


def test_sampled_logprobs_equal_trainer_recompute(stories, prompts):
    model, tok = stories
    params = SamplingParams(n=4, temperature=TEMPERATURE, top_p=0.9, max_new_tokens=24, seed=11)
    out = HFEngine(model, tok).generate(prompts, params)
    recomputed = trainer_logprobs(model, prompts, out.samples, tok.pad_token_id)
    worst = max(float((torch.tensor(s.logprobs) - r).abs().max()) for s, r in zip(out.samples, recomputed))
    assert worst < 1e-4, worst

    # And the convention is observable: temperature-scaled log-probs are clearly different.
    scaled = trainer_logprobs(model, prompts, out.samples, tok.pad_token_id, temperature=TEMPERATURE)
    gap = max(float((torch.tensor(s.logprobs) - r).abs().max()) for s, r in zip(out.samples, scaled))
    assert gap > 1e-2, gap


def test_greedy_and_top_k_logprobs_are_raw_too(tiny, stories, prompts):
    _, tok = stories
    engine = HFEngine(tiny, tok, eos_token_id=[])
    for params in (
        SamplingParams(temperature=0, max_new_tokens=16),
        SamplingParams(n=2, temperature=1.5, top_k=5, max_new_tokens=16, seed=1),
    ):
        out = engine.generate(prompts, params)
        recomputed = trainer_logprobs(tiny, prompts, out.samples, tok.pad_token_id)
        for s, r in zip(out.samples, recomputed):
            assert torch.allclose(torch.tensor(s.logprobs), r, atol=1e-4)
