"""The verbs every role model serves, whichever way its weights are held.

Roles: `actor` (the policy), `critic` (a value head), `reward` (a score head) and `reference`
(the frozen policy the KL penalty is measured against). `RoleModel` computes token log-probs,
per-token values and sequence scores, runs several inference-only roles in one call, and
exports the actor and the reward model in Hugging Face formats. Its subclasses only say how to
reach a role's causal LM and how to make a role active:

- `MultiHeadModel` (multihead.py): one base, a LoRA adapter per role, reference = adapters off.
- `SeparateModels` (separate.py): one model per role (full fine-tuning, or LoRA on copies).

Values and scores run the backbone (`causal_lm.base_model`) without the LM head, so a critic or
reward pass never materialises (B, T, V) logits.
"""

from __future__ import annotations

import functools
import inspect
import os
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

ROLES = ("actor", "critic", "reward")  # the trainable roles
REFERENCE = "reference"
HEADS = {"critic": "value_head", "reward": "score_head"}
HEAD_FILES = {"critic": "value_head.safetensors", "reward": "score_head.safetensors"}
# peft's LoRA parameter containers: keys holding one of these are adapter weights, not base weights.
_LORA_SEGMENTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector"}


def is_quantized(model: nn.Module) -> bool:
    """Whether a Hugging Face model's weights are stored quantized (bitsandbytes 4/8-bit, QLoRA)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
                or getattr(model, "is_quantized", False))


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(model_type: type) -> str:
    """The KV cache's forward keyword: `cache` (transformers >= 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def lm_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM (or of a peft model over one), whose forward returns the
    last hidden states without the LM head; LoRA layers live inside it, so they still apply."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.base_model


def head_logprobs(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                  entropy: bool = False):
    """log p(labels) (and entropies) of the next-token distributions at `hidden` (..., H), under
    `model`'s LM head at `temperature`. A plain linear head runs inside the log-prob function, chunk
    by chunk (`align.core.linear_logprobs`: no (..., V) logits kept for backward); a head with a
    bias, a LoRA layer or a logit softcap (Gemma-2) goes through full logits."""
    from align.core.linear_logprobs import linear_logprobs
    from align.core.logprobs import entropy_from_logits, logprobs_from_logits

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    if type(head) is nn.Linear and head.bias is None and not softcap:
        return linear_logprobs(hidden, head.weight, labels, temperature, entropy)
    logits = head(hidden)  # (..., V)
    if softcap:  # applied inside the causal LM's forward, so repeat it here
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature
    logp = logprobs_from_logits(logits, labels)  # fp32 whatever the logits' dtype
    return (logp, entropy_from_logits(logits)) if entropy else logp


def unpad(input_ids: torch.Tensor, attention_mask: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded rows -> packed rows, for a padding-free forward (veRL's `use_remove_padding`,
    OpenRLHF's `packing_samples`).

    input_ids, attention_mask: (B, T), each row's real tokens contiguous (left, right, or both
    sides padded). The B sequences are placed whole, first-fit in decreasing length, into R rows
    of at most T tokens (the longest sequence's room): without a variable-length attention
    kernel (flash-attention), attention over a packed row costs its length squared, so rows stay
    as short as the padded batch's and only the padding goes. Returns ids and position_ids
    (R, C), C <= T, positions restarting at 0 at each sequence (the padding at a row's end is one
    more sequence, attending to itself only); index (N,), each real token's place in the
    flattened (B * T) layout, in that order; and slots (N,), its place in the flattened (R * C)
    packed layout. Hugging Face models (transformers >= 5) read restarting position ids without
    an attention mask as packed sequences and attend within each one only
    (`masking_utils.find_packed_sequence_indices`: a block-diagonal causal mask for sdpa/eager,
    variable-length kernels for flash attention).
    """
    mask = attention_mask.bool()
    B, T = mask.shape
    lengths = mask.sum(1).tolist()
    room: list[int] = []  # free tokens per packed row
    row, offset = [0] * B, [0] * B
    for b in sorted(range(B), key=lambda b: -lengths[b]):  # first-fit decreasing; ties keep row order
        r = next((r for r, free in enumerate(room) if lengths[b] <= free), len(room))
        if r == len(room):
            room.append(T)
        row[b], offset[b] = r, T - room[r]
        room[r] -= lengths[b]
    R = max(len(room), 1)
    fill = torch.tensor([T - free for free in room] or [0], device=mask.device)  # (R,) tokens per packed row
    C = max(int(fill.max()), 1)
    index = mask.flatten().nonzero().squeeze(1)  # (N,)
    b_of = index // T
    pos = (mask.long().cumsum(-1) - 1).flatten()[index]  # (N,) position within its sequence
    slots = (torch.tensor(row, device=mask.device)[b_of] * C + torch.tensor(offset, device=mask.device)[b_of] + pos)
    ids = input_ids.new_zeros(R * C).index_copy(0, slots, input_ids.flatten()[index]).view(R, C)
    cols = torch.arange(C, device=mask.device).expand(R, C)
    positions = torch.where(cols >= fill[:, None], cols - fill[:, None], 0).flatten()  # the tail: 0, 1, ...
    positions = positions.index_copy(0, slots, pos).view(R, C)
    return ids, positions, index, slots


def packed_hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, N, H) last hidden states of the N real tokens of (B, T) padded rows, in row-major
    order, from one padding-free pass of `backbone` (a decoder stack, `lm_backbone`) over the
    packed rows of `unpad`, and their index (N,) into the flattened (B * T) layout."""
    ids, positions, index, slots = unpad(input_ids, attention_mask)
    hidden = backbone(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state  # (R, C, H)
    return hidden.flatten(0, 1)[slots][None], index


def pad_hidden(hidden: torch.Tensor, index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(1, N, H) packed hidden states -> (B, T, H), zeros at padding (`unpad`'s inverse)."""
    B, T = shape
    out = hidden.new_zeros(B * T, hidden.shape[-1]).index_copy(0, index, hidden[0])
    return out.view(B, T, -1)


def packed_token_logprobs(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, index: torch.Tensor,
                          shape: tuple[int, int], temperature: float = 1.0, entropy: bool = False,
                          score_mask: torch.Tensor | None = None):
    """(B, T-1) log p(x_{t+1} | x_{<=t}) in the padded layout from a padding-free pass.

    hidden: (1, N, H) and index (N,) from `packed_hidden` of input_ids (B, T) = `shape`.
    score_mask: (B, T-1) bool, the positions whose next token a loss reads (None: every real
    token followed by a real one); the LM head runs on these only. Other positions are 0
    (entropies too). With `entropy`, returns (log-probs, entropies).
    """
    B, T = shape
    nxt = (index[1:] == index[:-1] + 1) & (index[1:] % T != 0)  # (N-1,) packed token j+1 follows j in its row
    out_pos = (index[:-1] // T) * (T - 1) + index[:-1] % T  # (N-1,) token j's place in the (B, T-1) layout
    if score_mask is not None:
        nxt &= score_mask.flatten().to(nxt.device)[out_pos.clamp(max=B * (T - 1) - 1)]
    sel = nxt.nonzero().squeeze(1)  # (M,)
    labels = input_ids.flatten()[index[1:][sel]]  # (M,)
    res = head_logprobs(model, hidden[0, :-1][sel], labels, temperature, entropy)
    parts = res if entropy else (res,)
    padded = tuple(x.new_zeros(B * (T - 1)).index_copy(0, out_pos[sel], x).view(B, T - 1) for x in parts)
    return padded if entropy else padded[0]


def check_role(role: str, valid: Sequence[str], what: str = "role") -> None:
    if role not in valid:
        raise ValueError(f"unknown or disabled {what} {role!r}; valid here: {list(valid)}")


def pack_group_responses(row_prompt: torch.Tensor, lengths: torch.Tensor, width: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Responses -> packed rows that share a prompt, for the shared-prompt pass without padding.

    row_prompt: (B,) the distinct prompt of each row (the G samples of a GRPO group share one);
    lengths: (B,) real response tokens per row, each row's real tokens first (right padding);
    width: a packed row's most tokens (the padded responses' width: attention over a packed row
    costs its length times its context, so rows stay no longer than the padded ones). The
    responses of each prompt are placed whole, first-fit in decreasing length, into rows of at
    most `width` tokens; a row holds one prompt's responses only, so it attends to that prompt's
    cached keys and values. Returns packed_prompt (Rp,) each packed row's prompt; segment (Rp, C),
    C <= width, the row b whose response occupies each column (-1 - column at the tail: a
    sequence of its own); offset (B,) where row b's response starts in its packed row; and
    packed_row (B,) that packed row. Empty responses take no room (offset 0 of row 0).
    """
    B = len(lengths)
    rows: list[tuple[int, int]] = []  # (prompt, used tokens) per packed row
    packed_row, offset = [0] * B, [0] * B
    order = sorted(range(B), key=lambda b: (int(row_prompt[b]), -int(lengths[b]), b))
    for b in order:
        n, u = int(lengths[b]), int(row_prompt[b])
        if n == 0:
            continue
        r = next((i for i, (pu, used) in enumerate(rows) if pu == u and used + n <= width), len(rows))
        if r == len(rows):
            rows.append((u, 0))
        packed_row[b], offset[b] = r, rows[r][1]
        rows[r] = (u, rows[r][1] + n)
    if not rows:
        rows = [(int(row_prompt[0]) if B else 0, 0)]
    C = max(max(used for _, used in rows), 1)
    device = lengths.device
    cols = torch.arange(C, device=device)
    segment = (-1 - cols).repeat(len(rows), 1)  # (Rp, C)
    for b in range(B):
        n = int(lengths[b])
        if n:
            segment[packed_row[b], offset[b] : offset[b] + n] = b
    packed_prompt = torch.tensor([u for u, _ in rows], device=device)
    return packed_prompt, segment, torch.tensor(offset, device=device), torch.tensor(packed_row, device=device)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, so left-padded rows score as `generate` saw them."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row; works for left and right padding."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device)
    return (idx * (attention_mask != 0)).argmax(-1)


def make_head(hidden_size: int, *, bias: bool, device=None) -> nn.Linear:
    """A (hidden -> 1) head in fp32 whatever the base dtype: values and scores are regression targets.

    The score head has no bias so that it maps one-to-one onto the `score` layer of Hugging Face's
    `*ForSequenceClassification` models (which have none).
    """
    head = nn.Linear(hidden_size, 1, bias=bias, device=device, dtype=torch.float32)
    nn.init.normal_(head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
    if bias:
        nn.init.zeros_(head.bias)
    return head


def merged_state_dict(causal_lm: nn.Module, adapter: str | None) -> dict[str, torch.Tensor]:
    """The causal LM's state dict under its plain Hugging Face key names, `adapter`'s LoRA merged in.

    Works on a model with peft LoRA layers injected (keys `...q_proj.base_layer.weight`,
    `...lora_A.<name>.weight`) and on a plain one. The live weights are not touched: merged
    tensors are new (W + scale * B @ A, peft's own `get_delta_weight`), the rest are views.
    """
    sd = {}
    for key, tensor in causal_lm.state_dict().items():
        parts = key.split(".")
        if _LORA_SEGMENTS.intersection(parts):
            continue
        sd[".".join(p for p in parts if p != "base_layer")] = tensor
    if adapter is None:
        return sd
    sd.update({f"{name}.weight": w for name, w in merged_lora_weights(causal_lm, adapter).items()})
    return sd


def merged_lora_weights(causal_lm: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """{module name: W + scale * B @ A} for every LoRA layer of `causal_lm` holding `adapter`
    (new tensors; the live weights are not touched). Only these weights differ between the base
    and the merged model."""
    from peft.tuners.lora import LoraLayer

    if is_quantized(causal_lm):
        raise ValueError(
            "cannot merge a LoRA adapter into a quantized base; load the base in float32/bfloat16, "
            "load the adapter with `load_role`, and export from that model"
        )
    merged = {}
    for name, module in causal_lm.named_modules():
        if isinstance(module, LoraLayer) and adapter in (*module.lora_A.keys(), *module.lora_embedding_A.keys()):
            weight = module.get_base_layer().weight
            merged[name] = weight.detach() + module.get_delta_weight(adapter).to(weight.dtype)
    if not merged:
        raise ValueError(f"no LoRA layer holds adapter {adapter!r}")
    return merged


def strip_lora_layers(causal_lm: nn.Module) -> nn.Module:
    """Replace every peft LoRA layer of `causal_lm` by its base layer, in place: a plain model
    again, as fast as one that never had adapters. Returns `causal_lm`."""
    from peft.tuners.lora import LoraLayer

    names = [name for name, module in causal_lm.named_modules() if isinstance(module, LoraLayer)]
    for name in names:  # outermost first; a LoRA layer never nests another
        parent, _, child = name.rpartition(".")
        owner = causal_lm.get_submodule(parent) if parent else causal_lm
        setattr(owner, child, getattr(owner, child).get_base_layer())
    return causal_lm


def save_sequence_classifier(
    causal_lm: nn.Module,
    backbone_sd: dict[str, torch.Tensor],
    score_head: nn.Linear,
    pad_token_id: int | None,
    out_dir: str,
) -> None:
    """Write an `AutoModelForSequenceClassification` folder (num_labels=1) from a causal LM's weights.

    `backbone_sd` holds the causal LM's plain key names (from `merged_state_dict`); the backbone
    keys are renamed to the classifier's prefix, and its one head takes `score_head`'s weight.
    The model is built on the meta device, so exporting never holds a second full copy.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    if pad_token_id is None:
        raise ValueError("exporting a reward model needs pad_token_id: the classifier pools at the last non-pad token")
    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    config.pad_token_id = pad_token_id
    config.architectures = None
    config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    dtype = next(iter(backbone_sd.values())).dtype
    with torch.device("meta"):
        clf = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    src_prefix, dst_prefix = causal_lm.base_model_prefix + ".", clf.base_model_prefix + "."
    sd = {dst_prefix + k[len(src_prefix):]: v for k, v in backbone_sd.items() if k.startswith(src_prefix)}
    head_keys = [k for k in clf.state_dict() if not k.startswith(dst_prefix)]
    for key in head_keys:
        if key.endswith("weight"):
            sd[key] = score_head.weight.detach().to(dtype)
        else:  # a head with a bias, in architectures that have one: ours has none
            sd[key] = torch.zeros(1, dtype=dtype)
    clf.load_state_dict(sd, strict=True, assign=True)
    clf.save_pretrained(out_dir)


class RoleModel(nn.Module):
    """Token log-probs, values and scores for named roles; subclasses supply the weights.

    Subclass hooks: `_causal_lm(role)` (the Hugging Face causal LM computing that role, possibly
    with LoRA layers injected), `_activate(role)` (a context in which that role's weights are the
    ones its causal LM uses), `_generator(role)` (a module with `.generate`), `_adapter_name(role)`
    (the LoRA adapter to merge on export, or None), and `roles` (the trainable roles present).
    """

    is_lora: bool = False
    # Padding-free passes (`trainer.max_tokens_per_micro` set): a batch's sequences packed into
    # rows with restarting position ids (`unpad`); set by the trainer or worker that owns the model.
    packed: bool = False
    # ddp/fsdp2 replicas must run the same decoder passes: `response_log_probs` then takes the
    # shared-prompt pass whatever the rows (set by the worker's engine when its hooks reduce gradients)
    same_passes: bool = False
    multi_role_modes: tuple[str, ...] = ("separate",)
    value_head: nn.Linear | None
    score_head: nn.Linear | None
    pad_token_id: int | None
    roles: tuple[str, ...]

    # ---- hooks ---------------------------------------------------------------------------
    def _causal_lm(self, role: str) -> nn.Module:
        raise NotImplementedError

    @contextmanager
    def _activate(self, role: str) -> Iterator[None]:
        raise NotImplementedError

    def _generator(self, role: str) -> nn.Module:
        raise NotImplementedError

    def _adapter_name(self, role: str) -> str | None:
        raise NotImplementedError

    def _fused_hidden(self, mode: str, roles, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """role -> (B, T, H) last hidden states of one forward serving several roles."""
        raise NotImplementedError(f"{type(self).__name__} has no fused multi-role pass; use mode='separate'")

    # ---- shared pieces -------------------------------------------------------------------
    @property
    def served_roles(self) -> tuple[str, ...]:
        return (*self.roles, REFERENCE)

    def _backbone(self, role: str, input_ids, attention_mask, packed: bool | None = None) -> torch.Tensor:
        """(B, T, H) last hidden state of `role`'s backbone (zeros at padding when packed; None:
        `self.packed`); call inside `_activate(role)`."""
        if self.packed if packed is None else packed:
            hidden, index = packed_hidden(self._causal_lm(role).base_model, input_ids, attention_mask)
            return pad_hidden(hidden, index, tuple(input_ids.shape))
        out = self._causal_lm(role).base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def _token_logprobs(self, role: str, hidden, input_ids, temperature: float, entropy: bool = False):
        """(B, T-1) log p(x_{t+1} | x_{<=t}) from (B, T, H) hidden states, and with `entropy` also
        (B, T-1) the entropy of each next-token distribution; call inside `_activate(role)`."""
        return head_logprobs(self._causal_lm(role), hidden[:, :-1], input_ids[:, 1:], temperature, entropy)

    def _values_from_hidden(self, hidden) -> torch.Tensor:
        head = self.value_head
        return head(hidden.to(head.weight.dtype)).squeeze(-1)  # (B, T)

    def _scores_from_hidden(self, hidden, attention_mask) -> torch.Tensor:
        head = self.score_head
        last = last_token_index(attention_mask)  # (B,)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return head(pooled.to(head.weight.dtype)).squeeze(-1)  # (B,)

    # ---- verbs ---------------------------------------------------------------------------
    def log_probs(self, input_ids, attention_mask, role: str = "actor", temperature: float = 1.0) -> torch.Tensor:
        """Per-token log-probs of the next tokens under `role` (`actor` or `reference`).

        input_ids, attention_mask: (B, T). Returns (B, T-1): out[:, t] = log p(input_ids[:, t+1] |
        input_ids[:, :t+1]); positions after padding are garbage and must be masked by the caller.
        Logits are divided by `temperature` first, matching a rollout sampled at that temperature.
        """
        check_role(role, [r for r in self.served_roles if r in ("actor", REFERENCE)])
        with self._activate(role):
            if self.packed:
                hidden, index = packed_hidden(self._causal_lm(role).base_model, input_ids, attention_mask)
                return packed_token_logprobs(self._causal_lm(role), hidden, input_ids, index, tuple(input_ids.shape),
                                             temperature)
            hidden = self._backbone(role, input_ids, attention_mask)
            return self._token_logprobs(role, hidden, input_ids, temperature)

    def response_log_probs(self, prompt_ids, prompt_mask, response_ids, response_mask, role: str = "actor",
                           temperature: float = 1.0, entropy: bool = False):
        """(B, R) log p(y_r | x, y_<r) of every response token under `role` (`actor`/`reference`).

        prompt_ids, prompt_mask: (B, P), left-padded. response_ids, response_mask: (B, R),
        right-padded; positions after a response's end are garbage and must be masked.
        Rows that share a prompt share its forward pass (the G samples of a GRPO group): the
        distinct prompts run once with their keys and values cached, each row's response runs
        over its prompt's cache, and the LM head runs on response positions only. The numbers
        are those of `log_probs` over prompt + response (same positions, same attention) up to
        float rounding, and gradients flow through the cache into the prompts' pass. Without
        a shared prompt it is one pass over the whole rows. With `entropy` it returns
        (log-probs, entropies), both (B, R): the entropy of the distribution each token came from.

        Packed (`self.packed`): the shared-prompt pass runs the responses padding-free too,
        each prompt's responses packed into rows of at most R tokens (`pack_group_responses`)
        over that prompt's cached keys and values, with a block-diagonal causal mask (sdpa or
        eager attention); or, when that computes more (U distinct prompts: U * P + the real
        response tokens against every row's real tokens), the whole rows run packed (`unpad`).
        All paths give the same numbers.
        """
        check_role(role, [r for r in self.served_roles if r in ("actor", REFERENCE)])
        P = prompt_ids.shape[1]
        distinct, row_prompt = torch.unique(torch.cat([prompt_ids, prompt_mask.long()], 1), dim=0, return_inverse=True)
        R = response_ids.shape[1]
        lengths = response_mask.long().sum(1)
        right_padded = bool((response_mask.long().cumsum(1) == torch.arange(1, R + 1, device=lengths.device)
                             .clamp(max=lengths[:, None])).all())  # each row's real tokens first
        group_packed = self.packed and right_padded and self._custom_masks(role)
        shared_cost = len(distinct) * P + (int(response_mask.sum()) if group_packed else response_ids.numel())
        if self.packed and not self.same_passes and (len(distinct) == len(prompt_ids)
                                                     or int(prompt_mask.sum()) + int(response_mask.sum()) < shared_cost):
            ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask.long(), response_mask.long()], 1)
            score = torch.cat([torch.zeros_like(prompt_mask[:, 1:], dtype=torch.bool), response_mask.bool()], 1)
            with self._activate(role):
                hidden, index = packed_hidden(self._causal_lm(role).base_model, ids, mask)
                out = packed_token_logprobs(self._causal_lm(role), hidden, ids, index, tuple(ids.shape), temperature,
                                            entropy, score_mask=score)  # (B, P + R - 1)
            return tuple(x[:, P - 1 :] for x in out) if entropy else out[:, P - 1 :]
        if len(distinct) == len(prompt_ids) and not self.same_passes:
            ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask.long(), response_mask.long()], 1)
            with self._activate(role):
                hidden = self._backbone(role, ids, mask)[:, P - 1 :]  # (B, R + 1, H): the LM head on responses only
                return self._token_logprobs(role, hidden, ids[:, P - 1 :], temperature, entropy)
        from transformers import DynamicCache

        u_ids, u_mask = distinct[:, :P], distinct[:, P:]  # (U, P) each
        with self._activate(role):
            backbone = self._causal_lm(role).base_model
            cache = DynamicCache()
            kw = {_cache_kwarg_of(type(backbone)): cache}
            out = backbone(input_ids=u_ids, attention_mask=u_mask, position_ids=position_ids_from_mask(u_mask),
                           use_cache=True, **kw)
            last = out.last_hidden_state[:, -1:]  # (U, 1, H): left-padded, so every prompt ends in the last column
            if group_packed:
                return self._packed_responses(role, backbone, cache, kw, last, u_mask, row_prompt, response_ids,
                                              lengths, temperature, entropy)
            cache.batch_select_indices(row_prompt)  # (B, heads, P, d) per layer, rows in batch order
            positions = u_mask.sum(1)[row_prompt, None] + torch.arange(R, device=u_mask.device)  # (B, R)
            attention = torch.cat([prompt_mask.long(), response_mask.long()], 1)  # (B, P + R)
            hidden = backbone(input_ids=response_ids, attention_mask=attention, position_ids=positions,
                              use_cache=True, **kw).last_hidden_state  # (B, R, H)
            hidden = torch.cat([last[row_prompt], hidden], 1)  # (B, R + 1, H): position t scores token t + 1
            targets = torch.cat([response_ids[:, :1], response_ids], 1)  # the first column is never scored
            return self._token_logprobs(role, hidden, targets, temperature, entropy)

    def _custom_masks(self, role: str) -> bool:
        """Whether `role`'s attention takes a custom 4-D mask (sdpa or eager; not flash or flex)."""
        return getattr(self._causal_lm(role).config, "_attn_implementation", None) in ("sdpa", "eager")

    def _packed_responses(self, role, backbone, cache, kw, last, u_mask, row_prompt, response_ids, lengths,
                          temperature: float, entropy: bool):
        """The shared-prompt pass's second half without padding: (B, R) log-probs (and entropies)
        of the responses, run packed per prompt (`pack_group_responses`) over `cache`, the U
        distinct prompts' keys and values (U, heads, P, d) per layer, whose last hidden states
        are `last` (U, 1, H). Positions continue each prompt's; a response attends to its
        prompt's real tokens and causally to itself only. lengths: (B,) each response's real
        tokens, which come first in its row. Zeros past each response's end."""
        B, R = response_ids.shape
        P, device = u_mask.shape[1], response_ids.device
        packed_prompt, segment, offset, packed_row = pack_group_responses(row_prompt, lengths, R)
        rows, C = segment.shape
        cache.batch_select_indices(packed_prompt)  # (Rp, heads, P, d) per layer
        real = segment >= 0
        b = segment.clamp(min=0)  # (Rp, C)
        col = torch.arange(C, device=device)
        t = torch.where(real, col - offset[b], 0)  # position within the response
        ids = torch.where(real, response_ids[b, t], 0)
        positions = u_mask.sum(1)[packed_prompt, None] + t  # continues the prompt's positions
        causal = col[:, None] >= col[None, :]  # (C, C)
        allowed = torch.cat([u_mask[packed_prompt].bool()[:, None, :].expand(rows, C, P),
                             (segment[:, :, None] == segment[:, None, :]) & causal], 2)[:, None]  # (Rp, 1, C, P + C)
        if self._causal_lm(role).config._attn_implementation == "eager":  # eager adds the mask to the scores
            dtype = last.dtype
            allowed = torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        hidden = backbone(input_ids=ids, attention_mask=allowed, position_ids=positions, use_cache=True,
                          **kw).last_hidden_state  # (Rp, C, H)
        rb, rt = (torch.arange(R, device=device)[None, :] < lengths[:, None]).nonzero(as_tuple=True)  # (M,) real tokens
        U = last.shape[0]
        flat = torch.cat([last[:, 0], hidden.flatten(0, 1)])  # (U + Rp * C, H)
        # response token t is scored from position t - 1: its prompt's last token when t = 0
        src = torch.where(rt == 0, row_prompt[rb], U + packed_row[rb] * C + offset[rb] + rt - 1)
        res = head_logprobs(self._causal_lm(role), flat[src], response_ids[rb, rt], temperature, entropy)
        parts = res if entropy else (res,)
        padded = tuple(x.new_zeros(B, R).index_put((rb, rt), x) for x in parts)
        return padded if entropy else padded[0]

    def values(self, input_ids, attention_mask) -> torch.Tensor:
        """(B, T) critic value of each prefix x_{<=t} (critic adapter or model + value head)."""
        check_role("critic", self.roles)
        with self._activate("critic"):
            return self._values_from_hidden(self._backbone("critic", input_ids, attention_mask))

    def scores(self, input_ids, attention_mask) -> torch.Tensor:
        """(B,) reward-model score of each sequence, read at its last non-pad token."""
        check_role("reward", self.roles)
        with self._activate("reward"):
            hidden = self._backbone("reward", input_ids, attention_mask)
            return self._scores_from_hidden(hidden, attention_mask)

    @torch.no_grad()
    def multi_role_forward(
        self,
        input_ids,
        attention_mask,
        roles: Sequence[str] = (REFERENCE, "critic", "reward"),
        temperature: float = 1.0,
        mode: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Inference-only outputs of several roles on the same batch.

        Returns {"reference"/"actor": (B, T-1) log-probs, "critic": (B, T) values, "reward": (B,)
        scores} for the roles asked. Modes (`multi_role_modes` lists a class's; its first is the
        default, the faster in scripts/bench_multirole.py):
        - "separate": one forward per role;
        - "mixed": one forward over the batch repeated once per role, each copy under its own
          adapter (peft's mixed-adapter batches).
        """
        mode = mode or self.multi_role_modes[0]
        check_role(mode, self.multi_role_modes, what="multi-role mode")
        for role in roles:
            check_role(role, self.served_roles)
        was_training = self.training
        self.eval()  # inference-only: no dropout, whichever mode
        try:
            if mode == "separate":
                return {role: self._single_role(role, input_ids, attention_mask, temperature) for role in roles}
            return self._fused_outputs(mode, list(roles), input_ids, attention_mask, temperature)
        finally:
            self.train(was_training)

    def _fused_outputs(self, mode, roles, input_ids, attention_mask, temperature) -> dict[str, torch.Tensor]:
        hiddens = self._fused_hidden(mode, roles, input_ids, attention_mask)
        out = {}
        for role, hidden in hiddens.items():
            if role == "critic":
                out[role] = self._values_from_hidden(hidden)
            elif role == "reward":
                out[role] = self._scores_from_hidden(hidden, attention_mask)
            else:
                with self._activate(role):  # the LM head may itself carry a LoRA adapter
                    out[role] = self._token_logprobs(role, hidden, input_ids, temperature)
        return out

    def _single_role(self, role, input_ids, attention_mask, temperature):
        if role == "critic":
            return self.values(input_ids, attention_mask)
        if role == "reward":
            return self.scores(input_ids, attention_mask)
        return self.log_probs(input_ids, attention_mask, role=role, temperature=temperature)

    @contextmanager
    def using(self, role: str = "actor") -> Iterator[nn.Module]:
        """A module with `.generate` that computes `role` (actor or reference), sharing these weights."""
        check_role(role, [r for r in self.served_roles if r in ("actor", REFERENCE)])
        with self._activate(role):
            yield self._generator(role)

    def export_merged_actor(self, out_dir: str, tokenizer=None) -> None:
        """Write the actor as a plain Hugging Face causal-LM folder (`from_pretrained` loads it).

        With LoRA the adapter is merged into a copy of the weights it touches; the live model is
        unchanged.
        """
        check_role("actor", self.roles)
        lm = self._causal_lm("actor")
        sd = merged_state_dict(lm, self._adapter_name("actor"))
        lm.save_pretrained(out_dir, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    @property
    def can_merge_actor(self) -> bool:
        """Whether `merged_actor_copy` merges: a LoRA actor on an unquantized base. (A fully
        fine-tuned actor is already plain; its copy is taken only where the actor is sharded.)"""
        return ("actor" in self.roles and self._adapter_name("actor") is not None
                and not is_quantized(self._causal_lm("actor")))

    def merged_actor_copy(self) -> nn.Module:
        """A plain causal LM (no LoRA layers, frozen, in eval mode) computing the actor, for a
        rollout engine of its own: with LoRA a copy of the base with the actor's adapter merged in
        (generation at the bare model's speed), with full fine-tuning a copy of the actor (veRL's
        rollout weights: whole where the actor is sharded). Take it before the model is sharded.
        It costs one more copy of the base weights; `refresh_merged_actor` brings it up to date
        after an update. Tied weights stay tied (one parameter, as in the actor)."""
        import copy

        check_role("actor", self.roles)
        plain = strip_lora_layers(copy.deepcopy(self._causal_lm("actor")))
        plain.requires_grad_(False)
        plain.eval()
        self.refresh_merged_actor(plain)
        return plain

    @torch.no_grad()
    def refresh_merged_actor(self, plain: nn.Module) -> int:
        """Bring `plain` (from `merged_actor_copy`) up to the actor: with LoRA write W + scale *
        B @ A of the actor's current adapter, computed from the untouched base weights (no
        rounding accumulates over many refreshes); with full fine-tuning copy every parameter of
        the actor (whole ones: call it inside `TrainEngine.gathered` when sharded), cast to the
        copy's dtype. Returns the bytes written."""
        lm = self._causal_lm("actor")
        adapter = self._adapter_name("actor")
        if adapter is None:  # full fine-tuning: parameter by parameter, a tied one once
            live = dict(lm.named_parameters(remove_duplicate=False))
            pairs = [(target, live[name]) for name, target in plain.named_parameters()]
        else:
            pairs = [(plain.get_submodule(name).weight, weight)
                     for name, weight in merged_lora_weights(lm, adapter).items()]
        written = 0
        for target, weight in pairs:
            target.copy_(weight)
            written += target.numel() * target.element_size()
        return written

    def export_reward_model(self, out_dir: str, tokenizer=None) -> None:
        """Write the reward role as an `AutoModelForSequenceClassification` folder (num_labels=1).

        Its logits reproduce `scores` when the classifier's pooling (the rightmost token that is
        not `pad_token_id`) finds the same token as our attention mask: pad with a token that
        does not end real sequences.
        """
        check_role("reward", self.roles)
        lm = self._causal_lm("reward")
        sd = merged_state_dict(lm, self._adapter_name("reward"))
        save_sequence_classifier(lm, sd, self.score_head, self.pad_token_id, out_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir)

    def save(self, out_dir: str) -> None:
        """Every trainable role to `out_dir/<role>/` (see `save_role`)."""
        for role in self.roles:
            self.save_role(role, os.path.join(out_dir, role))

    def load(self, in_dir: str) -> None:
        for role in self.roles:
            self.load_role(role, os.path.join(in_dir, role))

    def save_role(self, role: str, out_dir: str) -> None:
        raise NotImplementedError

    def load_role(self, role: str, in_dir: str) -> None:
        raise NotImplementedError


def save_head(head: nn.Linear, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, path)


def load_head(head: nn.Linear, path: str) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(path, device=str(head.weight.device)), strict=True)
