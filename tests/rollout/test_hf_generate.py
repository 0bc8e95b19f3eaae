"""HFEngine.generate: greedy, sampling, n, stops, lengths, padding, chunking, beam search.

References are independent of the engine: a cache-free decode loop that re-runs the whole
sequence through the model at every step, on one unpadded prompt.
"""

from __future__ import annotations

import pytest
import torch

from rollout import HFEngine, RolloutEngine, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=20)


def naive_greedy(model, prompt, steps, stop_ids=()):
    """Argmax decode without KV cache or padding; returns (tokens, raw log-probs)."""
    ids, tokens, logprobs = list(prompt), [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]  # (V,)
            t = int(logits.argmax())
            tokens.append(t)
            logprobs.append(float(logits.log_softmax(-1)[t]))
            ids.append(t)
            if t in stop_ids:
                break
    return tokens, logprobs


def test_engine_satisfies_protocol(stories):
    assert isinstance(HFEngine(*stories), RolloutEngine)


def test_greedy_equals_plain_decode(stories, prompts):
    model, tok = stories
    out = HFEngine(model, tok).generate(prompts, GREEDY)
    assert len(out.samples) == len(prompts)
    for i, s in enumerate(out.samples):
        tokens, logprobs = naive_greedy(model, prompts[i], GREEDY.max_new_tokens, stop_ids={tok.eos_token_id})
        assert s.prompt_index == i
        assert s.token_ids == tokens
        assert s.logprobs == pytest.approx(logprobs, abs=1e-5)
        # The text reads as it does after the prompt (a leading space kept).
        assert tok.decode(prompts[i], skip_special_tokens=True) + s.text == tok.decode(
            prompts[i] + tokens, skip_special_tokens=True
        )
        assert s.finish_reason == "length"
    # The pretrained model writes English, so this is a real model, not noise.
    assert out.samples[0].text.startswith(", there was a little")
    assert out.samples[2].text.startswith(" ")  # "Tom" + " ...": SentencePiece would drop it alone


def test_greedy_on_tiny_random_llama(tiny, stories, prompts):
    _, tok = stories
    out = HFEngine(tiny, tok, eos_token_id=[]).generate(prompts, GREEDY)
    for i, s in enumerate(out.samples):
        tokens, logprobs = naive_greedy(tiny, prompts[i], GREEDY.max_new_tokens)
        assert s.token_ids == tokens
        assert s.logprobs == pytest.approx(logprobs, abs=1e-5)


def test_top_k_one_equals_greedy(stories, prompts):
    engine = HFEngine(*stories)
    greedy = engine.generate(prompts, GREEDY)
    topk1 = engine.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=20, seed=7))
    assert [s.token_ids for s in topk1.samples] == [s.token_ids for s in greedy.samples]


def test_seeded_sampling_is_deterministic_and_seed_sensitive(stories, prompts):
    engine = HFEngine(*stories)
    params = SamplingParams(n=2, temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=20, seed=123)
    rng_before = torch.get_rng_state()
    a = engine.generate(prompts, params)
    assert torch.equal(torch.get_rng_state(), rng_before), "a seeded call must not touch the global RNG"
    b = engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(**{**params.__dict__, "seed": 124}))
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
    assert [s.logprobs for s in a.samples] == [s.logprobs for s in b.samples]
    assert [s.token_ids for s in a.samples] != [s.token_ids for s in c.samples]


def test_unseeded_sampling_follows_the_global_rng(stories, prompts):
    engine = HFEngine(*stories)
    params = SamplingParams(temperature=1.0, max_new_tokens=12)
    torch.manual_seed(5)
    a = engine.generate(prompts, params)
    torch.manual_seed(5)
    b = engine.generate(prompts, params)
    assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]


def test_n_samples_are_grouped_prompt_major(stories, prompts):
    out = HFEngine(*stories).generate(prompts, SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=0))
    assert out.n == 3 and len(out.samples) == 3 * len(prompts)
    assert [s.prompt_index for s in out.samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    groups = out.by_prompt()
    assert len(groups) == len(prompts)
    for i, group in enumerate(groups):
        assert {s.prompt_index for s in group} == {i}
        assert len({tuple(s.token_ids) for s in group}) > 1, "samples of one prompt should differ"


def test_stop_token_ids_end_a_row_with_finish_reason_stop(stories, prompts):
    model, tok = stories
    engine = HFEngine(model, tok)
    full = engine.generate(prompts[:1], GREEDY).samples[0].token_ids
    j = next(j for j in range(3, len(full)) if full[j] not in full[:j])  # first occurrence
    stop = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=20, stop_token_ids=(full[j],)))
    s = stop.samples[0]
    assert s.token_ids == full[: j + 1]  # the stop token is kept in the ids, not in the text
    assert s.text == engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=j)).samples[0].text
    assert s.finish_reason == "stop"
    assert len(s.logprobs) == j + 1

    # The eos given to the constructor acts the same way.
    s2 = HFEngine(model, tok, eos_token_id=full[j]).generate(prompts[:1], GREEDY).samples[0]
    assert (s2.token_ids, s2.finish_reason) == (full[: j + 1], "stop")
    assert HFEngine(model, tok).eos_token_ids == (tok.eos_token_id,)


def test_stop_strings_cut_text_and_tokens(stories, prompts):
    model, tok = stories
    engine = HFEngine(model, tok)
    full = engine.generate(prompts[:2], GREEDY).samples
    full_text = full[0].text
    stop_str = "named Lily"  # spans several tokens of the greedy story
    assert stop_str in full_text and stop_str not in full[1].text
    out = engine.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=20, stop=(stop_str, "zzz")))
    s, other = out.samples
    assert s.finish_reason == "stop"
    assert s.text == full_text[: full_text.index(stop_str)]
    # token ids: the greedy prefix up to and including the token that completes the stop string
    assert s.token_ids == full[0].token_ids[: len(s.token_ids)]
    assert stop_str in tok.decode(s.token_ids) and stop_str not in tok.decode(s.token_ids[:-1])
    assert len(s.logprobs) == len(s.token_ids)
    # The other row of the batch is unaffected.
    assert (other.token_ids, other.finish_reason) == (full[1].token_ids, "length")


def test_max_new_tokens_and_context_length(stories, prompts):
    model, tok = stories
    engine = HFEngine(model, tok)
    for m in (1, 7):
        out = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=m, seed=0))
        assert all(len(s.token_ids) == m and s.finish_reason == "length" for s in out.samples)
    # A prompt near the context (512) gets only what fits: prompt + response <= 512.
    long_prompt = (prompts[0] * 200)[:508]
    s = engine.generate([long_prompt], SamplingParams(temperature=0, max_new_tokens=10)).samples[0]
    assert len(s.token_ids) == 4 and s.finish_reason == "length"
    with pytest.raises(ValueError, match="context"):
        engine.generate([prompts[0] * 200], GREEDY)


def test_invalid_requests_fail_clearly(stories, prompts):
    engine = HFEngine(*stories)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([prompts[0], []], GREEDY)
    with pytest.raises(ValueError, match="num_beams"):
        engine.generate(prompts, SamplingParams(n=3, num_beams=2, temperature=0))


@pytest.mark.parametrize("which", ["stories", "tiny"])
def test_left_padding_does_not_change_results(which, stories, tiny, prompts):
    """A short prompt alone, and batched (left-padded) behind a longer one, gives the same tokens."""
    model, tok = (stories[0], stories[1]) if which == "stories" else (tiny, stories[1])
    engine = HFEngine(model, tok, eos_token_id=[])
    short, long = prompts[2], prompts[1]
    assert len(long) > len(short) + 3
    alone = engine.generate([short], GREEDY).samples[0]
    batched = engine.generate([long, short], GREEDY).samples[1]
    assert batched.token_ids == alone.token_ids
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_chunking_by_max_batch_size_does_not_change_greedy(stories, prompts):
    model, tok = stories
    params = SamplingParams(n=2, temperature=0, max_new_tokens=12)
    whole = HFEngine(model, tok, max_batch_size=64).generate(prompts, params)
    chunked = HFEngine(model, tok, max_batch_size=2).generate(prompts, params)
    assert [s.token_ids for s in chunked.samples] == [s.token_ids for s in whole.samples]
    for a, b in zip(chunked.samples, whole.samples):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_on_step_reports_each_rows_tokens_as_sampled(stories, prompts):
    """3 prompts x n=2 = 6 rows in chunks of 4 and 2; a stop string ends rows at different steps.
    Each row's reported tokens, in order, are its token_ids; each step reports only rows still
    running; and the samples equal those of a call without the callback."""
    model, tok = stories
    engine = HFEngine(model, tok, max_batch_size=4)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3, stop=(" a",))
    reported: dict[int, list[int]] = {}
    steps = []

    def on_step(rows, tokens):
        assert len(rows) == len(tokens) and rows == sorted(rows)
        steps.append(rows)
        for r, t in zip(rows, tokens):
            reported.setdefault(r, []).append(t)

    out = engine.generate(prompts, params, on_step=on_step)
    assert [reported[r] for r in range(6)] == [s.token_ids for s in out.samples]
    assert steps[0] == [0, 1, 2, 3] and [4, 5] in steps  # chunk rows shifted to the call's
    assert len({len(s.token_ids) for s in out.samples}) > 1  # rows did stop at different steps
    plain = engine.generate(prompts, params)
    assert [s.token_ids for s in plain.samples] == [s.token_ids for s in out.samples]


def test_beam_search_returns_valid_scored_sequences(stories, prompts):
    model, tok = stories
    engine = HFEngine(model, tok)
    params = SamplingParams(n=2, num_beams=4, temperature=0, max_new_tokens=12)
    out = engine.generate(prompts[:2], params)
    assert [s.prompt_index for s in out.samples] == [0, 0, 1, 1]
    for s in out.samples:
        assert 0 < len(s.token_ids) <= 12 and len(s.logprobs) == len(s.token_ids)
        assert all(0 <= t < 512 for t in s.token_ids)
        assert s.finish_reason in ("stop", "length")
        # the reported log-probs are the raw ones of these very tokens
        prompt = prompts[s.prompt_index]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + s.token_ids])).logits[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    for group in out.by_prompt():
        assert group[0].token_ids != group[1].token_ids
    # On this input the best beam scores at least as well as greedy (same length, no eos).
    greedy = engine.generate(prompts[:2], SamplingParams(temperature=0, max_new_tokens=12)).samples
    for g, group in zip(greedy, out.by_prompt()):
        assert sum(group[0].logprobs) >= sum(g.logprobs) - 1e-5


def test_inverse_cdf_sampler_draws_each_token_at_its_probability():
    """The sampler behind every non-greedy decode step: 200k draws of fixed rows land within
    4 standard errors of each token's probability; zero-probability tokens (cut by top-k/top-p)
    are never drawn, even first or last in the vocabulary; the generator makes it repeatable."""
    from rollout.hf import _sample_categorical

    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0, 0.0, 0.5], [0.0] * 5 + [1.0]])
    n = 200_000
    draws = _sample_categorical(probs.repeat_interleave(n, 0), torch.Generator().manual_seed(0)).view(3, n)
    freq = torch.stack([torch.bincount(row, minlength=6) for row in draws]).double() / n
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 4 * stderr + 1e-12).all(), freq
    assert (freq[probs == 0] == 0).all()
    again = _sample_categorical(probs, torch.Generator().manual_seed(7))
    assert torch.equal(again, _sample_categorical(probs, torch.Generator().manual_seed(7)))


def test_shared_prefill_gives_each_row_its_own_prompt(stories, prompts):
    """Rows with the same prompt (n samples, or a prompt passed twice) share one prefill; every
    row must still decode its own prompt: greedy rows equal the cache-free decode of their prompt."""
    model, tok = stories
    twice = [prompts[0], prompts[1], prompts[0]]
    out = HFEngine(model, tok, max_batch_size=4).generate(twice, SamplingParams(n=2, temperature=0.0, max_new_tokens=8))
    for s in out.samples:
        expected, _ = naive_greedy(model, twice[s.prompt_index], 8, stop_ids={tok.eos_token_id})
        assert s.token_ids == expected, s.prompt_index
