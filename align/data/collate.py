"""Padding tokenized examples into batches of tensors.

Training batches are right-padded (real tokens first, so position ids are the usual 0..n-1 and
the last real token of row b is at `attention_mask[b].sum() - 1`); generation batches are
left-padded (every prompt ends at the last column, where generation continues).

Masks are aligned with `input_ids`: `loss_mask[b, t] = 1` when token t is a response token.
A trainer scoring token t uses the logits at t - 1, so it pairs `logits[:, :-1]` with
`input_ids[:, 1:]` and `loss_mask[:, 1:]`. `loss_mask` is float32 0/1; `attention_mask` is
int64, as Hugging Face models expect.

torch is imported on first use, so `import align.data` stays cheap for data-only tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from align.data.tokenize import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


def _width(seqs: Sequence[Sequence[int]], pad_to_multiple_of: int | None) -> int:
    width = max((len(s) for s in seqs), default=0)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    return width


def right_pad(seqs: Sequence[Sequence[int]], pad_value: int | float, *, pad_to_multiple_of: int | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, T) tensor (int64 unless `dtype`), row b = seqs[b] followed by `pad_value`."""
    import torch

    dtype = dtype or torch.long
    out = torch.full((len(seqs), _width(seqs, pad_to_multiple_of)), pad_value, dtype=dtype)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = torch.as_tensor(list(s), dtype=dtype)
    return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Prompts for generation: `input_ids` (B, T) padded on the left, `attention_mask` (B, T)."""
    import torch

    width = _width(seqs, pad_to_multiple_of)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        if len(s):
            ids[b, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[b, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def collate_sft(batch: Sequence[dict[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """`tokenize_sft` items -> input_ids (B, T), attention_mask (B, T), labels (B, T; -100 on
    prompt and padding)."""
    ids = [x["input_ids"] for x in batch]
    return {
        "input_ids": right_pad(ids, pad_id, pad_to_multiple_of=pad_to_multiple_of),
        "attention_mask": right_pad([[1] * len(s) for s in ids], 0, pad_to_multiple_of=pad_to_multiple_of),
        "labels": right_pad([x["labels"] for x in batch], IGNORE_INDEX, pad_to_multiple_of=pad_to_multiple_of),
    }


def _prompt_response_batch(prompts, responses, pad_id, pad_to_multiple_of):
    import torch

    seqs = [p + r for p, r in zip(prompts, responses)]
    masks = [[0.0] * len(p) + [1.0] * len(r) for p, r in zip(prompts, responses)]
    return {
        "input_ids": right_pad(seqs, pad_id, pad_to_multiple_of=pad_to_multiple_of),
        "attention_mask": right_pad([[1] * len(s) for s in seqs], 0, pad_to_multiple_of=pad_to_multiple_of),
        "loss_mask": right_pad(masks, 0.0, pad_to_multiple_of=pad_to_multiple_of, dtype=torch.float32),
    }


def collate_pairs(batch: Sequence[dict[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """`tokenize_pairs` items -> one forward pass for both sides.

    Returns input_ids, attention_mask, loss_mask, each (2B, T): rows [0, B) are prompt+chosen,
    rows [B, 2B) prompt+rejected of the same pairs, so `x[:B]` and `x[B:]` line up pair by pair.
    """
    prompts = [x["prompt_ids"] for x in batch] * 2
    responses = [x["chosen_ids"] for x in batch] + [x["rejected_ids"] for x in batch]
    return _prompt_response_batch(prompts, responses, pad_id, pad_to_multiple_of)


def collate_kto(batch: Sequence[dict[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """`tokenize_kto` items -> input_ids, attention_mask, loss_mask (B, T) and label (B,) bool."""
    import torch

    out = _prompt_response_batch([x["prompt_ids"] for x in batch], [x["completion_ids"] for x in batch],
                                 pad_id, pad_to_multiple_of)
    out["label"] = torch.tensor([bool(x["label"]) for x in batch], dtype=torch.bool)
    return out


def collate_prompts(batch: Sequence[dict[str, Any]], pad_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, Any]:
    """`tokenize_prompts` items -> left-padded input_ids, attention_mask (B, T), plus the lists
    `prompt`, `ground_truth` and `metadata` (one entry per row) for the reward step."""
    out: dict[str, Any] = left_pad([x["prompt_ids"] for x in batch], pad_id, pad_to_multiple_of=pad_to_multiple_of)
    for key in ("prompt", "ground_truth", "metadata"):
        out[key] = [x.get(key) for x in batch]
    return out
