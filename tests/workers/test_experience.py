"""The Experience batch: splitting, sharding and concatenating keep every row intact; trimming
padding changes nothing on real tokens; the response slice lines up with the model's outputs."""

from __future__ import annotations

import pytest
import torch

from align.workers.batch import Experience


def rows(B: int = 5) -> Experience:
    """Row i: a prompt of i % 3 + 1 tokens (left-padded to 3) and a response of i % 4 + 1 tokens
    (right-padded to 4); token values encode (row, position) so any mix-up shows."""
    P, R = 3, 4
    prompt_mask = torch.zeros(B, P, dtype=torch.long)
    response_mask = torch.zeros(B, R, dtype=torch.bool)
    for i in range(B):
        prompt_mask[i, P - (i % 3 + 1):] = 1
        response_mask[i, : i % 4 + 1] = True
    prompt_ids = (torch.arange(B)[:, None] * 100 + torch.arange(P)) * prompt_mask
    response_ids = (torch.arange(B)[:, None] * 100 + 50 + torch.arange(R)) * response_mask
    return Experience(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, group_ids=torch.arange(B) // 2,
                      advantages=torch.randn(B, R) * response_mask, scores=torch.arange(B).float(),
                      response_text=[f"r{i}" for i in range(B)], finish_reason=["stop"] * B)


def real_tokens(e: Experience) -> list[tuple[list[int], list[int]]]:
    """Each row's real prompt and response tokens, padding removed."""
    return [(e.prompt_ids[i][e.prompt_mask[i].bool()].tolist(), e.response_ids[i][e.response_mask[i]].tolist())
            for i in range(len(e))]


def test_chunk_then_concat_restores_the_rows():
    e = rows(5)
    shards = e.chunk(2)
    assert [len(s) for s in shards] == [3, 2]
    # shards trimmed to different widths still concatenate back (re-padded on the correct sides)
    back = Experience.concat([s.trim() for s in shards])
    assert real_tokens(back) == real_tokens(e)
    assert back.response_text == e.response_text and torch.equal(back.scores, e.scores)
    assert torch.equal(back.advantages[back.response_mask], e.advantages[e.response_mask])


def test_list_fields_follow_the_rows_and_must_be_filled_in_every_part_or_none():
    e = rows(5).replace(prompts=[f"p{i}" for i in range(5)])
    a, b = e.chunk(2)
    assert a.prompts == ["p0", "p1", "p2"] and e.select([4, 0]).prompts == ["p4", "p0"]
    assert Experience.concat([a, b]).prompts == e.prompts
    assert Experience.concat([a.replace(prompts=[]), b.replace(prompts=[])]).prompts == []
    with pytest.raises(ValueError, match="'prompts' is filled in some parts"):
        Experience.concat([a, b.replace(prompts=[])])


def test_more_shards_than_rows_gives_empty_shards_that_concat_ignores():
    e = rows(2)
    shards = e.chunk(3)
    assert [len(s) for s in shards] == [1, 1, 0]
    assert real_tokens(Experience.concat(shards)) == real_tokens(e)


def test_trim_drops_only_all_padding_columns():
    e = rows(3).select([0, 1])  # prompts of 1 and 2 tokens, responses of 1 and 2 tokens
    t = e.trim()
    assert t.prompt_ids.shape[1] == 2 and t.response_ids.shape[1] == 2
    assert real_tokens(t) == real_tokens(e)
    assert t.response_slice == slice(1, 3)


def test_minibatches_partition_the_rows():
    e = rows(8)
    mbs = e.minibatches(2, torch.Generator().manual_seed(0))
    seen = sorted(t for mb in mbs for t in mb.scores.tolist())
    assert [len(mb) for mb in mbs] == [4, 4] and seen == list(range(8))
    assert [mb.scores.tolist() for mb in e.minibatches(1)] == [list(map(float, range(8)))]


def test_response_slice_reads_the_model_outputs_of_the_response_tokens():
    """Next-token log-probs of a real model, read at `response_slice`, equal those computed one
    row at a time without any padding."""
    from align.core import logprobs_from_logits
    from align.models import build_tiny_llama

    model = build_tiny_llama(vocab_size=512)
    e = rows(4)
    e = e.replace(prompt_ids=e.prompt_ids % 512, response_ids=e.response_ids % 512)
    with torch.no_grad():
        pos = (e.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=e.input_ids, attention_mask=e.attention_mask, position_ids=pos).logits
        batched = logprobs_from_logits(logits[:, :-1], e.input_ids[:, 1:])[:, e.response_slice]
        for i, (p, r) in enumerate(real_tokens(e)):
            ids = torch.tensor([p + r])
            alone = logprobs_from_logits(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[0, len(p) - 1:]
            torch.testing.assert_close(batched[i][e.response_mask[i]], alone, atol=1e-5, rtol=1e-5)
