"""Summed response log-probs log pi(y|x) of a causal LM, the quantity every preference loss takes.

Two ways to get them for k responses per prompt (k = 2 for a chosen/rejected pair):

- `concatenated_logps`: k rows of prompt + response, one forward over (kB, P + R) tokens;
- `shared_prompt_logps`: the prompt once, (B, P) tokens, its keys and values cached and repeated
  k times, then the k responses over that cache, (kB, R) tokens. The prompt's work is done once
  instead of k times, and the LM head runs only where a response token is scored. The numbers
  are those of the concatenated forward (same positions, same attention), up to float rounding.
  Gradients flow through the cached keys and values into the prompt's forward.

Both run the decoder stack for hidden states and score them through the LM head in chunks
(`align.models.roles.head_logprobs`): no (rows, tokens, vocabulary) logits are kept for the
backward pass.

With `trainer.max_tokens_per_micro` the concatenated rows run padding-free (`packed`), and a
trainer takes, per micro-batch, whichever of the two computes fewer positions
(`shared_prompt_cost`): padding-free rows repeat the prompt, the shared pass pads.

Batches are right-padded. Response row k * b + j is the j-th response of prompt b.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import DynamicCache

from align.core import sequence_logps
from align.data import right_pad
from align.models.roles import _cache_kwarg_of, head_logprobs, lm_backbone, packed_hidden, packed_token_logprobs


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
                   loss_mask: torch.Tensor, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the response tokens of each row, and the number of them.

    Args:
        input_ids, attention_mask, loss_mask: (N, T), right-padded; loss_mask 1 on response tokens.
        packed: run the rows padding-free, packed (`align.models.roles.unpad`), the LM
            head on response positions only; the same numbers up to float rounding.

    Returns:
        logps (N,) float32 (with grad if the model has it); lengths (N,).
    """
    if packed:
        hidden, index = packed_hidden(lm_backbone(model), input_ids, attention_mask)  # (1, N_real, H)
        token_logps = packed_token_logprobs(model, hidden, input_ids, index, tuple(input_ids.shape),
                                            score_mask=loss_mask[:, 1:].bool())  # (N, T-1)
        return sequence_logps(token_logps, loss_mask[:, 1:])
    hidden = lm_backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    token_logps = head_logprobs(model, hidden[:, :-1], input_ids[:, 1:])  # (N, T-1): t scores token t+1
    return sequence_logps(token_logps, loss_mask[:, 1:])


def concatenated_logps(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                       response_ids: torch.Tensor, response_mask: torch.Tensor,
                       k: int, packed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(kB,) summed response log-probs and lengths with one forward over prompt + response rows
    (`packed`: padding-free, see `response_logps`)."""
    kB, R = response_ids.shape
    P = prompt_ids.shape[1]
    starts = prompt_mask.sum(1).repeat_interleave(k)  # (kB,) each response starts after its prompt
    cols = starts[:, None] + torch.arange(R, device=starts.device)  # (kB, R)
    ids = torch.cat([prompt_ids.repeat_interleave(k, 0), response_ids.new_zeros(kB, R)], 1)  # (kB, P+R)
    ids = ids.scatter(1, cols, response_ids)  # responses overwrite the prompts' padding
    attention = torch.cat([prompt_mask.repeat_interleave(k, 0), prompt_mask.new_zeros(kB, R)], 1)
    attention = attention.scatter(1, cols, response_mask)
    loss_mask = torch.zeros(kB, P + R, device=ids.device).scatter(1, cols, response_mask.float())
    return response_logps(model, ids, attention, loss_mask, packed)


def shared_prompt_cost(prompt_mask: torch.Tensor, response_mask: torch.Tensor, k: int) -> tuple[int, int]:
    """Positions a forward computes for k responses per prompt: (shared-prompt pass, padded:
    B * P + kB * R; padding-free concatenated rows: k * prompt tokens + response tokens). The
    shared pass wins when a long prompt is shared and the responses are of similar lengths."""
    return prompt_mask.numel() + response_mask.numel(), k * int(prompt_mask.sum()) + int(response_mask.sum())


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
    backbone = lm_backbone(model)
    cache, name = DynamicCache(), _cache_kwarg_of(type(backbone))  # filled in place by the prompt's forward
    hidden = backbone(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                      **{name: cache}).last_hidden_state  # (B, P, H)
    first_hidden = hidden[torch.arange(B, device=last.device), last]  # (B, H): scores the first response token
    cache.batch_repeat_interleave(k)  # (kB, heads, P, d) keys and values per layer
    position_ids = prompt_len.repeat_interleave(k)[:, None] + torch.arange(R, device=prompt_len.device)  # (kB, R)
    attention = torch.cat([prompt_mask.repeat_interleave(k, 0), response_mask], 1)  # (kB, P+R): prompt padding masked
    hidden = backbone(input_ids=response_ids, attention_mask=attention, position_ids=position_ids, use_cache=True,
                      **{name: cache}).last_hidden_state  # (kB, R, H): position t scores token t+1
    hidden = torch.cat([first_hidden.repeat_interleave(k, 0)[:, None], hidden[:, :-1]], 1)  # (kB, R, H)
    return sequence_logps(head_logprobs(model, hidden, response_ids), response_mask)
