"""Collators: padding, masks aligned with what a model's loss reads, left padding for generation."""

from __future__ import annotations

import pytest
import torch

from align.data import (
    PairExample,
    SFTExample,
    collate_kto,
    collate_pairs,
    collate_prompts,
    collate_sft,
    left_pad,
    tokenize_pairs,
    tokenize_sft,
)
from align.data.packing import collate_packed, pack_sft

PAD = 0


@pytest.fixture(scope="module")
def stories_model(stories_path):
    """stories260K on one thread: its matrices are tiny, and on a busy 2-core machine two
    OpenMP threads spend most of their time waiting for each other (25x slower here)."""
    from align.models.loading import load_causal_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_causal_lm(stories_path).eval()
    torch.set_num_threads(threads)


def test_collate_sft_padding_and_labels():
    batch = [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7]}, {"input_ids": [1, 9], "labels": [-100, 9]}]
    out = collate_sft(batch, PAD)
    assert out["input_ids"].tolist() == [[1, 5, 6, 7], [1, 9, PAD, PAD]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 6, 7], [-100, 9, -100, -100]]
    assert out["input_ids"].dtype == out["labels"].dtype == out["attention_mask"].dtype == torch.long
    assert collate_sft(batch, PAD, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)


def test_sft_labels_give_the_models_loss_on_response_tokens_only(stories_tok, stories_model):
    """The model's own loss on the collated batch equals an independent loop: the mean of
    -log p(token t | tokens < t) over response tokens t only."""
    examples = [SFTExample("Once upon a time", " there was a cat."), SFTExample("Lily went", " to the park to play.")]
    items = tokenize_sft(examples, stories_tok, 64)
    batch = collate_sft(items, stories_tok.pad_token_id)
    with torch.no_grad():
        loss = stories_model(**batch).loss
        total, count = 0.0, 0
        for item in items:
            logp = torch.log_softmax(stories_model(torch.tensor([item["input_ids"]])).logits[0], -1)
            for t, label in enumerate(item["labels"]):
                if label != -100:
                    total -= logp[t - 1, label].item()
                    count += 1
    assert count == sum(len(i["input_ids"]) - len(stories_tok(e.prompt)["input_ids"]) for e, i in zip(examples, items))
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_collate_pairs_rows_and_loss_masks(stories_tok):
    pairs = [PairExample("Once upon a time", " a cat", " a big red dog ran"), PairExample("Tom", " ran", " sat")]
    items = tokenize_pairs(pairs, stories_tok, 64)
    out = collate_pairs(items, PAD)
    B = len(items)
    assert out["input_ids"].shape[0] == 2 * B
    for b, item in enumerate(items):
        p = len(item["prompt_ids"])
        for row, resp in ((b, item["chosen_ids"]), (B + b, item["rejected_ids"])):
            n = p + len(resp)
            assert out["input_ids"][row, :n].tolist() == item["prompt_ids"] + resp
            assert (out["input_ids"][row, n:] == PAD).all()
            assert out["attention_mask"][row].tolist() == [1] * n + [0] * (out["input_ids"].shape[1] - n)
            assert out["loss_mask"][row].tolist() == [0.0] * p + [1.0] * len(resp) + [0.0] * (out["input_ids"].shape[1] - n)
    assert out["loss_mask"].dtype == torch.float32


def test_collate_kto_and_prompts():
    kto = collate_kto([{"prompt_ids": [1, 2], "completion_ids": [3], "label": True},
                       {"prompt_ids": [1], "completion_ids": [4, 5, 6], "label": False}], PAD)
    assert kto["label"].tolist() == [True, False]
    assert kto["loss_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 1]]
    prompts = collate_prompts([{"prompt_ids": [1, 2, 3], "prompt": "a", "ground_truth": "7", "metadata": {}},
                               {"prompt_ids": [1], "prompt": "b", "ground_truth": None, "metadata": {"k": 1}}], PAD)
    assert prompts["input_ids"].tolist() == [[1, 2, 3], [PAD, PAD, 1]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prompts["ground_truth"] == ["7", None] and prompts["metadata"] == [{}, {"k": 1}]


def test_left_pad_shapes():
    out = left_pad([[5, 6], [], [7]], PAD, pad_to_multiple_of=4)
    assert out["input_ids"].tolist() == [[PAD, PAD, 5, 6], [PAD] * 4, [PAD, PAD, PAD, 7]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]]


def test_left_padded_generation_matches_unpadded(stories_tok, stories_model):
    prompts = [stories_tok(p)["input_ids"] for p in ("Once upon a time, there was a little", "Tom")]
    batch = left_pad(prompts, stories_tok.pad_token_id)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=stories_tok.pad_token_id)
    with torch.no_grad():
        together = stories_model.generate(**batch, **kw)[:, batch["input_ids"].shape[1]:]
        for b, ids in enumerate(prompts):
            alone = stories_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), **kw)
            assert together[b].tolist() == alone[0, len(ids):].tolist()


# ---- packing ------------------------------------------------------------------------------


def _seg_len(positions, start):
    end = start + 1
    while end < len(positions) and positions[end] != 0:
        end += 1
    return end - start


def test_pack_sft_layout():
    items = [{"input_ids": [1] * n, "labels": [7] * n} for n in (5, 3, 4, 2, 6)]
    rows = pack_sft(items, 8)
    # first-fit decreasing: 6 opens row 0, 5 row 1, 4 row 2, then 3 joins row 1 and 2 row 0;
    # inside a row the items keep their input order
    segments = [[_seg_len(r["position_ids"], s) for s, p in enumerate(r["position_ids"]) if p == 0] for r in rows]
    assert segments == [[2, 6], [5, 3], [4]]
    for r in rows:
        starts = [t for t, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][t] == -100 for t in starts)  # no item's first token is a target
        assert sum(label != -100 for label in r["labels"]) == len(r["input_ids"]) - len(starts)
    with pytest.raises(ValueError, match="item 0 has 9 tokens, more than max_length=8"):
        pack_sft([{"input_ids": [1] * 9, "labels": [1] * 9}], 8)


def test_packed_forward_equals_separate_forwards(stories_tok, stories_model):
    """Per-item logits inside a packed row equal that item's logits alone, and the packed loss
    equals the token-weighted loss of the items run one by one: nothing crosses items."""
    texts = [("Once upon a time", " there was a cat."), ("Lily", " saw a big dog."), ("Tom ran", " home."), ("", "The sun.")]
    items = tokenize_sft([SFTExample(p, r) for p, r in texts], stories_tok, 64)
    rows = pack_sft(items, 40)
    assert len(rows) < len(items)
    batch = collate_packed(rows, stories_tok.pad_token_id)
    assert "attention_mask" not in batch
    with torch.no_grad():
        packed = stories_model(**batch, use_cache=False)
        total, count = 0.0, 0
        for item in items:
            ids = torch.tensor([item["input_ids"]])
            alone = stories_model(ids, labels=torch.tensor([item["labels"]]))
            n = sum(label != -100 for label in item["labels"][1:])
            total, count = total + alone.loss.item() * n, count + n
            # find the item inside the packed batch and compare logits
            found = False
            for b, row in enumerate(rows):
                for t in (t for t, p in enumerate(row["position_ids"]) if p == 0):
                    if row["input_ids"][t : t + ids.shape[1]] == item["input_ids"]:
                        torch.testing.assert_close(packed.logits[b, t : t + ids.shape[1]], alone.logits[0], atol=1e-5, rtol=1e-4)
                        found = True
            assert found
    assert packed.loss.item() == pytest.approx(total / count, rel=1e-5)
