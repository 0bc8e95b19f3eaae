"""Turning config into objects: the trainable model and the tokenized data of a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from align.config import DataConfig, ModelConfig
from align.models.loading import ensure_pad_token, load_causal_lm, load_tokenizer


def load_base(cfg: ModelConfig, meta: bool = False):
    """The configured causal LM (dtype, device, optional 4-bit base) and its tokenizer, with a
    pad token set on both when the tokenizer has none: what every model builder starts from.
    meta: the architecture only, on the meta device (`TrainEngine.init_on_meta`)."""
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    extra = {"quantization": cfg.quantization} if cfg.quantization else {}
    model = load_causal_lm(cfg.name_or_path, dtype=cfg.dtype, device=cfg.device,
                           trust_remote_code=cfg.trust_remote_code, meta=meta, **extra)
    ensure_pad_token(tokenizer, model)
    return model, tokenizer


def on_meta(tcfg) -> bool:
    """Whether this process builds its model on the meta device: a replica other than rank 0
    under ddp or fsdp2 (`TrainEngine.init_on_meta`; `prepare` fills it from rank 0)."""
    from align.engine import TrainEngine, distributed

    return TrainEngine.init_on_meta(tcfg.strategy, distributed.rank(), distributed.world_size())


def model_device(model, cfg: ModelConfig):
    """Where `model`'s parameters are, or will be once `TrainEngine.prepare` fills a model built
    on the meta device (`cfg.device`)."""
    from align.models.loading import resolve_device

    device = next(model.parameters()).device
    return resolve_device(cfg.device) if device.type == "meta" else device


def role_config(cfg: ModelConfig):
    """`cfg.lora` as the `RoleConfig` of a role of the shared multi-head model."""
    from align.models.multihead import RoleConfig

    target = cfg.lora.target_modules
    return RoleConfig(r=cfg.lora.r, alpha=float(cfg.lora.alpha), dropout=cfg.lora.dropout,
                      target_modules=target if isinstance(target, str) else tuple(target))


def build_policy(cfg: ModelConfig, meta: bool = False):
    """The model a trainer updates, and its tokenizer (with a pad token).

    finetune=full: every parameter trains. finetune=lora: a peft LoRA adapter over a frozen
    base (`cfg.lora`), optionally a 4-bit base (`quantization=nf4`, QLoRA). meta: built on the
    meta device, for `TrainEngine.prepare` to fill from rank 0.
    """
    model, tokenizer = load_base(cfg, meta)
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


@dataclass
class TokenizedData:
    """A run's tokenized train and validation items, with the counts of what was read,
    skipped, truncated and dropped, and the collator that pads a list of items into a batch."""

    train: list[dict]
    val: list[dict]
    stats: dict
    stats_line: str
    collate: Callable[[list[dict]], object]


def load_sft_data(cfg: DataConfig, tokenizer) -> TokenizedData:
    """Read `cfg.source`, split it deterministically, tokenize for SFT (prompt tokens masked)."""
    from align.data import DataStats, build_split, collate_sft, tokenize_sft
    from align.trainers.sft import SFTBatch

    stats = DataStats()
    train, val = build_split(
        cfg.source, cfg.format, val_fraction=cfg.val_fraction, val_size=cfg.val_size, seed=cfg.seed,
        columns=dict(cfg.columns), on_error=cfg.on_error, limit=cfg.limit, split=cfg.split, stats=stats,
    )
    kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
              max_response_length=cfg.max_response_length, overlong=cfg.overlong, stats=stats)
    train_items, val_items = tokenize_sft(train, tokenizer, **kw), tokenize_sft(val, tokenizer, **kw)
    if not train_items:
        raise ValueError(f"data.source {cfg.source}: no training examples left; {stats.summary()}")
    pad = tokenizer.pad_token_id
    return TokenizedData(train_items, val_items, stats.as_dict(), stats.summary(),
                         lambda items: SFTBatch(**collate_sft(items, pad)))
