"""Packing several SFT sequences into one row, without attention or loss crossing between them.

A packed row concatenates whole `tokenize_sft` items; `position_ids` restart at 0 at each
item. Hugging Face models (transformers >= 5) read restarting position ids, when no attention
mask is passed and no KV cache is used, as packed sequences: sdpa/eager/flex attention get a
block-diagonal causal mask and flash-attention the matching variable-length kernel. So call

    model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False)

with no `attention_mask` (passing one disables the detection and lets items attend to each
other). The first token of every item has label -100: the model's shifted loss would otherwise
train the previous item's last token to predict it.

Items are placed first-fit in decreasing length (deterministic: ties keep input order), so a
shuffled input stays shuffled only across rows, not within them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from align.data.collate import right_pad
from align.data.tokenize import IGNORE_INDEX


def pack_sft(items: Sequence[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """`tokenize_sft` items -> packed rows `{"input_ids", "labels", "position_ids"}`, each at
    most `max_length` tokens. Every item is kept whole; an item longer than `max_length` is an
    error (tokenize with the same `max_length` first)."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    rows: list[list[int]] = []  # item indices per row
    room: list[int] = []
    for i in order:
        n = len(items[i]["input_ids"])
        if n > max_length:
            raise ValueError(f"item {i} has {n} tokens, more than max_length={max_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    packed = []
    for row in rows:
        ids, labels, pos = [], [], []
        for i in sorted(row):  # input order within a row
            item = items[i]
            ids += item["input_ids"]
            labels += [IGNORE_INDEX] + list(item["labels"][1:])
            pos += list(range(len(item["input_ids"])))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return packed


def collate_packed(batch: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Packed rows -> input_ids, labels, position_ids (B, T), and no attention_mask.

    The padding at the end of a row is one more "item" (its positions restart at 0) with labels
    -100, so no real token attends to it and it adds no loss.
    """
    width = max(len(x["input_ids"]) for x in batch)
    pos = [list(x["position_ids"]) + list(range(width - len(x["input_ids"]))) for x in batch]
    return {
        "input_ids": right_pad([x["input_ids"] for x in batch], pad_id),
        "labels": right_pad([x["labels"] for x in batch], IGNORE_INDEX),
        "position_ids": right_pad(pos, 0),
    }
