"""Turning config into objects: the trainable model and the tokenized data of a run."""

from __future__ import annotations

from align.config import DataConfig, ModelConfig
from align.models.loading import ensure_pad_token, load_causal_lm, load_tokenizer


def build_policy(cfg: ModelConfig):
    """The model a trainer updates, and its tokenizer (with a pad token).

    finetune=full: every parameter trains. finetune=lora: a peft LoRA adapter over a frozen
    base (`cfg.lora`), optionally a 4-bit base (`quantization=nf4`, QLoRA).
    """
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    extra = {"quantization": cfg.quantization} if cfg.quantization else {}
    model = load_causal_lm(cfg.name_or_path, dtype=cfg.dtype, device=cfg.device,
                           trust_remote_code=cfg.trust_remote_code, **extra)
    ensure_pad_token(tokenizer, model)
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        if cfg.quantization:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        target = cfg.lora.target_modules
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
            target_modules=target if isinstance(target, str) else list(target), task_type="CAUSAL_LM",
        ))
    return model, tokenizer
