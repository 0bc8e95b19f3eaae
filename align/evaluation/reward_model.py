"""Evaluating a reward model on preference pairs: `python -m align algo=eval data=hh_pairs algo.model=<rm>`.

The model is either our RM job's output (`<run>/reward_model`, a sequence classifier, or
`<run>/reward`, the reward role on the policy's base `model.name_or_path`) or any Hugging Face
sequence classifier with one output. Every pair is tokenized as the RM job tokenizes its
training pairs (`align.data.tokenize_pairs` with the `data.max_*` lengths), so the held-out
accuracy of the RM job and this one agree on the same pairs; each response is scored at its
last token, chosen and rejected rows of a batch in one forward.

Reported (`align.core.evaluation.pairwise_report`): pairwise accuracy, margin statistics, and
accuracy by response length against the "longer response wins" baseline on the same pairs
(lengths in characters of the responses as the data gives them, untruncated).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from align.config import RunConfig
from align.core.evaluation import pairwise_report
from align.models.scorer import reward_model_kind


def load_pair_scorer(path: str, cfg: RunConfig) -> tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Any]:
    """A function (input_ids, attention_mask) (R, T) -> (R,) scores and the model's tokenizer.

    path: a sequence-classifier folder or hub id, or a `save_role("reward")` folder (its base is
    `model.name_or_path`; LoRA rank, alpha and targets are read from the saved adapter).
    """
    if reward_model_kind(path) == "role":
        from align.trainers.rm import build_reward_model

        m = cfg.model
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            from peft import LoraConfig as PeftLora

            saved = PeftLora.from_pretrained(path)
            targets = saved.target_modules
            lora = dataclasses.replace(m.lora, r=saved.r, alpha=saved.lora_alpha,
                                       target_modules=targets if isinstance(targets, str) else sorted(targets))
            m = dataclasses.replace(m, finetune="lora", lora=lora, quantization=None)
        else:
            m = dataclasses.replace(m, finetune="full", quantization=None)
        model, tokenizer = build_reward_model(m)
        model.load_role("reward", path)
        model.eval()
        return (lambda ids, mask: model.scores(ids, mask).float()), tokenizer

    from transformers import AutoConfig, AutoModelForSequenceClassification

    from align.models.loading import ensure_pad_token, load_tokenizer, resolve_device, resolve_dtype

    m = cfg.model
    architectures = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code).architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ValueError(f"algo.model {path!r}: pair data evaluates a reward model (an RM job's reward_model/ or "
                         f"reward/, or a sequence classifier); this is {architectures or 'no classifier'}")
    model = AutoModelForSequenceClassification.from_pretrained(
        path, dtype=resolve_dtype(m.dtype), trust_remote_code=m.trust_remote_code).to(resolve_device(m.device)).eval()
    if model.config.num_labels != 1:
        raise ValueError(f"algo.model {path!r}: a reward model has one output (num_labels=1); this classifier has "
                         f"{model.config.num_labels}")
    tokenizer = load_tokenizer(path, trust_remote_code=m.trust_remote_code)
    pad = model.config.pad_token_id
    if pad is not None and pad >= 0:  # the classifier pools at its last non-pad token: pad with its pad id
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(int(pad))
    else:
        ensure_pad_token(tokenizer, model)
        model.config.pad_token_id = tokenizer.pad_token_id
    device = next(model.parameters()).device
    def score(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float().cpu()

    return score, tokenizer


def _text_length(text: Any) -> int:
    """Characters of a response given as text or as chat messages."""
    if isinstance(text, str):
        return len(text)
    return sum(len(str(m.get("content", ""))) for m in text)


@torch.no_grad()
def score_pairs(score: Callable, items: list[dict], pad_id: int, batch_size: int, progress: bool) -> tuple[list, list]:
    """Chosen and rejected scores of tokenized pairs, `batch_size` pairs per (2B, T) forward."""
    from tqdm.auto import tqdm

    from align.data import collate_pairs

    chosen, rejected = [], []
    for i in tqdm(range(0, len(items), batch_size), desc="eval rm", unit="batch", disable=not progress):
        batch = collate_pairs(items[i : i + batch_size], pad_id)
        s = score(batch["input_ids"], batch["attention_mask"])  # (2B,): chosen rows, then rejected rows
        b = len(s) // 2
        chosen += s[:b].tolist()
        rejected += s[b:].tolist()
    return chosen, rejected


def evaluate_reward_model(cfg: RunConfig, examples: list, path: str, stats) -> tuple[dict, list[dict]]:
    """(summary, per-pair rows) of the reward model at `path` on the pair `examples`."""
    from align.data import tokenize_pairs

    d, algo = cfg.data, cfg.algo
    score, tokenizer = load_pair_scorer(path, cfg)
    kw = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length,
              max_response_length=d.max_response_length, overlong=d.overlong, stats=stats)
    kept, items = [], []
    for ex in examples:  # one pair per call keeps each length with its pair when an over-long pair is dropped
        tokenized = tokenize_pairs([ex], tokenizer, **kw)
        if tokenized:
            kept.append(ex)
            items.append(tokenized[0])
    if not items:
        raise ValueError(f"data.source {d.source}: no pairs left to evaluate; {stats.summary()}")
    chosen, rejected = score_pairs(score, items, tokenizer.pad_token_id, algo.batch_size, cfg.trainer.progress)
    len_c = [_text_length(ex.chosen) for ex in kept]
    len_r = [_text_length(ex.rejected) for ex in kept]
    report = pairwise_report(chosen, rejected, len_c, len_r, num_buckets=algo.length_buckets)
    rows = [{"index": i, "chosen_score": c, "rejected_score": r, "margin": c - r, "correct": c > r,
             "chosen_length": lc, "rejected_length": lr}
            for i, (c, r, lc, lr) in enumerate(zip(chosen, rejected, len_c, len_r))]
    return {"kind": "reward_model", "model": path, **report}, rows


def format_report(summary: dict) -> str:
    """A few readable lines: accuracy against the length baseline, overall and per bucket."""
    lines = [f"pairwise accuracy {summary['accuracy']:.4f} on {summary['pairs']} pairs "
             f"(longer response wins: {summary['length_baseline']:.4f}); margin mean "
             f"{summary['margin']['mean']:.3f}, median {summary['margin']['median']:.3f}"]
    for b in summary["by_length"]:
        lines.append(f"  mean length {b['min_length']:>7.0f}-{b['max_length']:<7.0f} {b['pairs']:>5} pairs: "
                     f"accuracy {b['accuracy']:.4f}, length baseline {b['length_baseline']:.4f}")
    for key in ("chosen_longer", "chosen_shorter"):
        g = summary[key]
        if g["pairs"]:
            lines.append(f"  {key.replace('_', ' ')}: {g['pairs']} pairs, accuracy {g['accuracy']:.4f}")
    return "\n".join(lines)
