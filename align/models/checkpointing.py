"""Activation checkpointing of every decoder layer, safe for our KV-cached training passes.

    enable_activation_checkpointing(model)   # trainer.gradient_checkpointing=true; TrainEngine.prepare calls it

A checkpointed layer keeps only its input for the backward pass and runs its forward again there
to rebuild what it needs (Chen et al., "Training Deep Nets with Sublinear Memory Cost",
arXiv:1604.06174): activations drop from every layer's saved tensors to one hidden state per
layer plus one layer's tensors at a time, for one more forward pass of compute. Each decoder layer
is its own checkpoint, through `torch.utils.checkpoint` in its non-reentrant form, as torchtitan
and veRL apply it (per transformer block).

Why not Hugging Face's `gradient_checkpointing_enable()`: while training it sets `use_cache=False`
and drops the layers' KV cache (`GradientCheckpointingLayer`, transformers 5; the model's forward
does the same through `merge_with_config_defaults`), because the backward's replay of a layer would
write its keys and values into the cache a second time. Our shared-prompt passes train through a
cache: DPO's `shared_prompt_logps` (the prompt once, both responses over its cached keys and
values) and `RoleModel.response_log_probs` (one prompt pass per GRPO group, its cache gathered per
row); without the cache the responses would silently be scored without their prompt.

Here a layer's first run uses the real cache (it appends this pass's keys and values, which the
next pass reads, gradient included). The replay runs the same layer code against a private copy of
the cache as it was before that run: `update` returns the same concatenated keys and values, and
the shared cache is not written again. The copy is shallow (DynamicCache layers replace their
tensors on update, never write them in place), so it costs no memory beyond the prefix's keys and
values, which the backward holds anyway.

The replay also restores what was active at the first run in the layer's LoRA layers (peft's
active adapter and the disabled flag): `MultiHeadModel` switches roles on the one shared base, and a
role's loss may be built, another role run, and then `backward` called. Dropout replays the same
masks (the checkpoint restores the RNG state), autocast the same precision. Without gradients
(generation, reference and old log-probs) a layer runs as it is.
"""

from __future__ import annotations

import copy
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CACHE_KWARGS = ("cache", "past_key_values")  # the cache's keyword: transformers >= 5.2x, and before


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: Hugging Face's `GradientCheckpointingLayer` modules
    (every decoder layer of a transformers 5 model), outermost only."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and not any(name.startswith(p + ".") for p in found):
            found[name] = module
    return list(found.values())


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer of `model` (any module holding Hugging Face causal LMs: a
    plain or peft-wrapped LM, a `MultiHeadModel`, a `SeparateModels`). In place and idempotent;
    parameter names and state dicts are unchanged (the layer's `forward` is wrapped, the module is
    not). Call before or after peft injects its LoRA layers. Returns the number of layers
    checkpointed; a model without Hugging Face decoder layers is an error."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"trainer.gradient_checkpointing: {type(model).__name__} has no Hugging Face decoder layers "
                         "(transformers' GradientCheckpointingLayer) to checkpoint")
    for layer in layers:
        if getattr(layer, "_align_checkpointed", False):
            continue
        if getattr(layer, "gradient_checkpointing", False):
            raise ValueError(f"{type(layer).__name__} already has Hugging Face gradient checkpointing on, which drops "
                             "the KV cache in training; call model.gradient_checkpointing_disable() first")
        layer.forward = functools.partial(_checkpointed_forward, layer, layer.forward)
        layer._align_checkpointed = True
    return len(layers)


def is_checkpointed(model: nn.Module) -> bool:
    """Whether `enable_activation_checkpointing` was applied to `model`'s decoder layers."""
    layers = decoder_layers(model)
    return bool(layers) and all(getattr(layer, "_align_checkpointed", False) for layer in layers)


def _checkpointed_forward(layer: nn.Module, forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    name = next((k for k in CACHE_KWARGS if kwargs.get(k) is not None), None)
    before = _snapshot(kwargs[name]) if name else None
    adapters = _adapter_state(layer)
    first = [kwargs]  # the real cache reaches the first run only; the replays keep no reference to it
    replay = {k: v for k, v in kwargs.items() if k != name}

    def run(*inputs):
        if first:
            return forward(*inputs, **first.pop())
        if name:
            replay[name] = _snapshot(before)  # a fresh private copy for each replay
        with _restored(adapters):
            return forward(*inputs, **replay)

    return checkpoint(run, *args, use_reentrant=False)


def _snapshot(cache):
    """A copy of `cache` whose updates leave `cache` as it is: the cache object and its per-layer
    objects copied, their tensors shared (a DynamicCache layer's update replaces its tensors by a
    concatenation, never writes into them)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(isinstance(layer, DynamicLayer) for layer in layers) or getattr(cache, "offloading", False):
        raise TypeError(f"activation checkpointing trains through a DynamicCache only, got {type(cache).__name__}")
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in layers]
    return out


def _adapter_state(layer: nn.Module) -> list[tuple[nn.Module, object, bool]]:
    """(LoRA layer, active adapter, disabled) for every peft tuner layer inside `layer`."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft not installed: no adapters
        return []
    return [(m, m._active_adapter, m._disable_adapters) for m in layer.modules() if isinstance(m, BaseTunerLayer)]


class _restored:
    """Set the tuner layers' adapter state saved by `_adapter_state` for the replay, then put back
    whatever is active now. Attributes only: parameters' requires_grad stay as they are."""

    def __init__(self, state):
        self.state = state

    def __enter__(self):
        self.now = [(m, m._active_adapter, m._disable_adapters) for m, _, _ in self.state]
        for m, active, disabled in self.state:
            m._active_adapter, m._disable_adapters = active, disabled

    def __exit__(self, *exc):
        for m, active, disabled in self.now:
            m._active_adapter, m._disable_adapters = active, disabled
