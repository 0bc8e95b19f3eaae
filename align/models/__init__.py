"""Model loading and the shared multi-head model (one base, a LoRA adapter per role)."""

from align.models.loading import (
    DEFAULT_MODEL,
    build_tiny_llama,
    ensure_pad_token,
    load_causal_lm,
    load_model_and_tokenizer,
    load_tokenizer,
    quantization_config,
    resolve_device,
    resolve_dtype,
    tiny_llama_config,
)
from align.models.multihead import MultiHeadModel, RoleConfig
from align.models.roles import REFERENCE, ROLES, RoleModel
from align.models.separate import SeparateModels

__all__ = [
    "DEFAULT_MODEL",
    "MultiHeadModel",
    "REFERENCE",
    "ROLES",
    "RoleConfig",
    "RoleModel",
    "SeparateModels",
    "build_tiny_llama",
    "ensure_pad_token",
    "load_causal_lm",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "quantization_config",
    "resolve_device",
    "resolve_dtype",
    "tiny_llama_config",
]
