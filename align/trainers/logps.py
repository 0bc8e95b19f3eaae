"""Summed response log-probs log pi(y|x) of a causal LM, the quantity every preference loss takes.

Two ways to get them for k responses per prompt (k = 2 for a chosen/rejected pair):

- `concatenated_logps`: k rows of prompt + response, one forward over (kB, P + R) tokens;
- `shared_prompt_logps`: the prompt once, (B, P) tokens, its keys and values cached and repeated
  k times, then the k responses over that cache, (kB, R) tokens. The prompt's work is done once
  instead of k times, and the LM head runs only where a response token is scored. The numbers
  are those of the concatenated forward (same positions, same attention), up to float rounding.
  Gradients flow through the cached keys and values into the prompt's forward.

Batches are right-padded. Response row k * b + j is the j-th response of prompt b.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from align.core import logprobs_from_logits, sequence_logps
from align.data import right_pad
from align.models.roles import _cache_kwarg_of


def collate_sequences(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask (int64) and loss_mask (float; 1 on response
    tokens), each (N, T), for N (prompt, response) sequences."""
    ids = [list(p) + list(r) for p, r in seqs]
    masks = [[0.0] * len(p) + [1.0] * len(r) for p, r in seqs]
    return {
        "input_ids": right_pad(ids, pad_id),
        "attention_mask": right_pad([[1] * len(s) for s in ids], 0),
        "loss_mask": right_pad(masks, 0.0, dtype=torch.float32),
    }


def collate_shared(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                   pad_id: int) -> dict[str, torch.Tensor]:
    """prompt_ids, prompt_mask (B, P) and response_ids, response_mask (kB, R), right-padded;
    `responses[k * b + j]` answers `prompts[b]`. Masks are int64 (1 on real tokens)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("shared-prompt batches need a non-empty prompt (its last token scores the first "
                         "response token)")
    return {
        "prompt_ids": right_pad(prompts, pad_id),
        "prompt_mask": right_pad([[1] * len(p) for p in prompts], 0),
        "response_ids": right_pad(responses, pad_id),
        "response_mask": right_pad([[1] * len(r) for r in responses], 0),
    }


def response_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each row, and the number of them.

    Args:
        input_ids, attention_mask, loss_mask: (N, T), right-padded; loss_mask 1 on response tokens.

    Returns:
        logps (N,) float32 (with grad if the model has it); lengths (N,).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, T, V)
    token_logps = logprobs_from_logits(logits[:, :-1], input_ids[:, 1:])  # (N, T-1): t scores token t+1
    return sequence_logps(token_logps, loss_mask[:, 1:])


def concatenated_logps(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       response_ids: torch.Tensor, response_mask: torch.Tensor,
                       k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kB,) summed response log-probs and lengths with one forward over prompt + response rows."""
    kB, R = response_ids.shape
    P = prompt_ids.shape[1]
    starts = prompt_mask.sum(1).repeat_interleave(k)  # (kB,) each response starts after its prompt
    cols = starts[:, None] + torch.arange(R, device=starts.device)  # (kB, R)
    ids = torch.cat([prompt_ids.repeat_interleave(k, 0), response_ids.new_zeros(kB, R)], 1)  # (kB, P+R)
    ids = ids.scatter(1, cols, response_ids)  # responses overwrite the prompts' padding
    attention = torch.cat([prompt_mask.repeat_interleave(k, 0), prompt_mask.new_zeros(kB, R)], 1)
    attention = attention.scatter(1, cols, response_mask)
    loss_mask = torch.zeros(kB, P + R, device=ids.device).scatter(1, cols, response_mask.float())
    return response_logps(model, ids, attention, loss_mask)


def shared_prompt_logps(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                        response_ids: torch.Tensor, response_mask: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kB,) summed response log-probs and lengths, the prompt run once for its k responses.

    Args:
        prompt_ids, prompt_mask: (B, P), right-padded, every prompt at least one token.
        response_ids, response_mask: (kB, R), right-padded; row k * b + j answers prompt b.
    """
    B, P = prompt_ids.shape
    R = response_ids.shape[1]
    prompt_len = prompt_mask.sum(1)  # (B,)
    last = prompt_len - 1  # the position whose logits score the first response token
    keep = torch.unique(last)  # (U,) sorted; the LM head runs on these columns only
    cache, name = DynamicCache(), _cache_kwarg(model)  # filled in place by the prompt's forward
    out = model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True, logits_to_keep=keep, **{name: cache})
    first_logits = out.logits[torch.arange(B, device=keep.device), torch.searchsorted(keep, last)]  # (B, V)
    cache.batch_repeat_interleave(k)  # (kB, heads, P, d) keys and values per layer
    position_ids = prompt_len.repeat_interleave(k)[:, None] + torch.arange(R, device=prompt_len.device)  # (kB, R)
    attention = torch.cat([prompt_mask.repeat_interleave(k, 0), response_mask], 1)  # (kB, P+R): prompt padding masked
    logits = model(input_ids=response_ids, attention_mask=attention, position_ids=position_ids, use_cache=True,
                   **{name: cache}).logits  # (kB, R, V): position t scores token t+1
    first = logprobs_from_logits(first_logits.repeat_interleave(k, 0)[:, None], response_ids[:, :1])  # (kB, 1)
    rest = logprobs_from_logits(logits[:, :-1], response_ids[:, 1:])  # (kB, R-1)
    return sequence_logps(torch.cat([first, rest], 1), response_mask)


def _cache_kwarg(model: torch.nn.Module) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values` (earlier; removed in 5.40)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(base))
