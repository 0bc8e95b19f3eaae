"""A lean decode step for Llama-family models: the HF engine's fast path for token-by-token sampling.

A Hugging Face forward for one new token per row runs every module's `__call__`, builds a 4-D
attention mask, grows each layer's KV cache by `torch.cat` (a full copy per step) and dispatches
attention through the attention-interface registry. For the small models RL runs on CPU that
bookkeeping is most of a decode step. `LlamaDecoder` computes the same step from the model's own
weights with plain tensor ops into a KV cache allocated once for the whole response, the keys
stored transposed so that attention reads them as one strided matrix per row (a vLLM engine has
its own kernels; this is what the CPU backend gets instead). The prompt is still prefilled by the
model's forward, and its cache copied in.

Covered: `LlamaForCausalLM`, `MistralForCausalLM` and `Qwen2ForCausalLM` whose projections are
plain `nn.Linear` (a merged rollout copy, a plain policy; not LoRA layers or quantized linears),
with any rotary scaling that does not depend on the sequence length (not "dynamic"/"longrope") and
no sliding window shorter than the sequence. Anything else returns None from `LlamaDecoder.build`
and the engine keeps the model's forward. Logits equal the forward's to float rounding (tested
against it, GQA, biases and left padding included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _model_classes() -> tuple[type, ...]:
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    return LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM


class LlamaDecoder:
    """Decode steps over a static KV cache, reading the weights of `model` (no copy).

    Use: `build(model, total_length)`; `start(cache, attention_mask, rows, total_length)` after
    the prompts' prefill; then `step(tokens, positions)` once per new token.
    """

    def __init__(self, model: nn.Module):
        inner = model.model
        attn = inner.layers[0].self_attn
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.embed = inner.embed_tokens.weight
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.lm_head = model.lm_head.weight
        self.rotary = inner.rotary_emb
        self.layers = [
            (
                (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                (layer.self_attn.q_proj.weight, layer.self_attn.q_proj.bias),
                (layer.self_attn.k_proj.weight, layer.self_attn.k_proj.bias),
                (layer.self_attn.v_proj.weight, layer.self_attn.v_proj.bias),
                (layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias),
                (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                (layer.mlp.gate_proj.weight, layer.mlp.gate_proj.bias),
                (layer.mlp.up_proj.weight, layer.mlp.up_proj.bias),
                (layer.mlp.down_proj.weight, layer.mlp.down_proj.bias),
                layer.mlp.act_fn,
            )
            for layer in inner.layers
        ]

    @classmethod
    def build(cls, model: nn.Module, total_length: int) -> "LlamaDecoder | None":
        """A decoder for `model` if it is covered (see the module docstring) for sequences of up to
        `total_length` tokens, else None."""
        if type(model) not in _model_classes():  # a peft wrapper, remote code or another architecture
            return None
        config, inner = model.config, model.model
        if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None or type(inner.embed_tokens) is not nn.Embedding:
            return None
        rope_type = str(getattr(inner.rotary_emb, "rope_type", "default"))
        if "dynamic" in rope_type or rope_type == "longrope":  # scaling that depends on the sequence length
            return None
        if len({p.device for p in model.parameters()}) != 1:  # spread over devices (device_map)
            return None
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and total_length > window:
            return None
        for layer in inner.layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if attn is None or mlp is None or any(hasattr(attn, n) for n in ("q_norm", "k_norm", "sinks")):
                return None
            linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
            if any(type(m) is not nn.Linear for m in linears):
                return None
        return cls(model)

    def start(self, cache, attention_mask: torch.Tensor, rows: torch.Tensor | None, total_length: int) -> None:
        """Take over the prefill's KV cache.

        cache:          the model's cache after the prompts' forward; layer i's keys and values
                        (U, KVH, P, D).
        attention_mask: (B, P) the prompts' mask, of the rows (already gathered by `rows`).
        rows:           (B,) index into the U prefilled prompts of each row, or None for U == B.
        total_length:   P + the most new tokens any row may take.
        """
        B, P = attention_mask.shape
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        ref = keys[0]
        shape = (B, self.kv_heads, total_length, self.head_dim)
        self.keys_t, self.values = [], []  # per layer (B, KVH, D, T) and (B, KVH, T, D)
        for k, v in zip(keys, values):
            if rows is not None:
                k, v = k[rows], v[rows]
            kt = ref.new_zeros(shape[0], shape[1], shape[3], shape[2])
            kt[..., :P] = k.transpose(-1, -2)
            vv = ref.new_zeros(shape)
            vv[:, :, :P] = v
            self.keys_t.append(kt)
            self.values.append(vv)
        # Additive mask (B, 1, 1, T): 0 where a row attends, -inf on its left padding.
        self.mask = ref.new_zeros(B, 1, 1, total_length, dtype=torch.float32)
        self.mask[:, 0, 0, :P].masked_fill_(attention_mask == 0, float("-inf"))
        self.length = P
        positions = torch.arange(int(attention_mask.sum(-1).max()) + total_length - P, device=ref.device)
        cos, sin = self.rotary(ref, positions[None])  # (1, L, D) each, in the model's dtype
        self.cos, self.sin = cos[0], sin[0]

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token, given this step's tokens (B,) at positions (B,)."""
        B, t, D = tokens.shape[0], self.length, self.head_dim
        half, groups = D // 2, self.heads // self.kv_heads
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, D)
        mask = self.mask[..., : t + 1]  # (B, 1, 1, t+1)
        x = F.embedding(tokens, self.embed)  # (B, hidden)
        for i, (norm1, q_proj, k_proj, v_proj, o_proj, norm2, gate, up, down, act) in enumerate(self.layers):
            h = _rms_norm(x, *norm1)
            q = F.linear(h, *q_proj).view(B, self.heads, D)
            k = F.linear(h, *k_proj).view(B, self.kv_heads, D)
            v = F.linear(h, *v_proj).view(B, self.kv_heads, D)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin  # rotary (rotate-half form)
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            self.keys_t[i][..., t] = k
            self.values[i][:, :, t] = v
            q = q.view(B, self.kv_heads, groups, D)  # query heads grouped by their key/value head
            scores = torch.matmul(q, self.keys_t[i][..., : t + 1]).float() * self.scaling + mask  # (B, KVH, G, t+1)
            probs = scores.softmax(-1).to(v.dtype)
            attended = torch.matmul(probs, self.values[i][:, :, : t + 1]).reshape(B, self.heads * D)
            x = x + F.linear(attended, *o_proj)
            h = _rms_norm(x, *norm2)
            x = x + F.linear(act(F.linear(h, *gate)) * F.linear(h, *up), *down)
        self.length += 1
        return F.linear(_rms_norm(x, *self.final_norm), self.lm_head)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in fp32, scaled in the input's dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
