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

`token_budget_micro_batches` cuts an optimizer step's examples into micro-batches by a token
budget (`trainer.max_tokens_per_micro`) instead of a row count; the trainers run each
micro-batch padding-free (align/models/roles.py `unpad`).
"""

from __future__ import annotations

import heapq
import math
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


def token_budget_micro_batches(lengths: Sequence[int], max_tokens: int, min_count: int = 1,
                               key: str = "trainer.max_tokens_per_micro") -> list[list[int]]:
    """Indices of the examples of one optimizer step, cut into micro-batches of at most
    `max_tokens` tokens each (the sum of `lengths` of a micro-batch: what a padding-free pass
    computes), as few as the budget allows and at least `min_count`.

    The examples are balanced over k = max(min_count, ceil(sum / max_tokens)) micro-batches,
    longest first into the lightest (Graham's LPT rule, as veRL's `rearrange_micro_batches`
    balances its dynamic batches); k grows until every micro-batch fits. `min_count` lets
    data-parallel ranks agree on one count (veRL all-reduces the MAX of theirs): with fewer
    examples than `min_count`, the extra micro-batches are empty. Deterministic; each
    micro-batch lists its indices in increasing order, micro-batches in order of their first index.

    Raises ConfigError (naming `key`) when one example alone is longer than `max_tokens`.
    """
    from align.config import ConfigError

    if max_tokens < 1:
        raise ConfigError(f"{key}: must be > 0, got {max_tokens!r}")
    if lengths and max(lengths) > max_tokens:
        i = max(range(len(lengths)), key=lambda j: lengths[j])
        raise ConfigError(f"{key}={max_tokens} is smaller than example {i} of this step ({lengths[i]} tokens); "
                          f"raise it to at least the longest sequence (data.max_length, or prompt + response)")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    k = max(min_count, 1, math.ceil(sum(lengths) / max_tokens))
    while True:
        bins: list[list[int]] = [[] for _ in range(k)]
        heap = [(0, b) for b in range(k)]  # (tokens, bin): the lightest bin on top, lowest index on ties
        for i in order:
            load, b = heapq.heappop(heap)
            bins[b].append(i)
            heapq.heappush(heap, (load + lengths[i], b))
        if max(load for load, _ in heap) <= max_tokens:
            break
        k += 1
    bins = [sorted(b) for b in bins]
    return sorted(bins, key=lambda b: (not b, b[0] if b else 0))
