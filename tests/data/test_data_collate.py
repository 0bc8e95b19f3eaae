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
