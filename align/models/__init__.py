"""Model loading and the shared multi-head model (one base, a LoRA adapter per role)."""

from align.models.loading import (
    DEFAULT_MODEL,
    build_tiny_llama,
    ensure_pad_token,
    load_causal_lm,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tiny_llama_config,
)

__all__ = [
    "DEFAULT_MODEL",
    "build_tiny_llama",
    "ensure_pad_token",
    "load_causal_lm",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "tiny_llama_config",
]
