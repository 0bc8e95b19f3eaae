"""Evaluating a policy on prompts: n samples per prompt (and a greedy one), scored by a reward.

Reported, over the prompts (the names lm-evaluation-harness and veRL's validation use):
- `mean@n`: the mean reward of all n samples per prompt;
- `pass@k` for each k in `algo.k`: the unbiased estimator of Chen et al. 2021 (Eq. 1) from each
  prompt's n samples, a sample being correct when its reward >= `algo.threshold`;
- `maj@k`: the majority vote over the first k samples' extracted, normalised answers
  (`rewards.math`'s extractors; only with a reward that extracts answers, e.g. `reward=math`);
- `greedy`: the fraction of greedy responses that are correct, `greedy_reward` their mean reward;
- `response_length` (tokens; mean, median, max) and `truncated_frac`: the fraction of samples
  that hit `rollout.max_new_tokens` or the context.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from align.config import RunConfig
from align.core.evaluation import maj_at_k, pass_at_k

ADAPTER_CONFIG = "adapter_config.json"


# ------------------------------------------------------------------------------ the statistics


def sample_metrics(scores: Sequence[Sequence[float]], threshold: float, ks: Sequence[int],
                   answers: Optional[Sequence[Sequence[Optional[str]]]] = None) -> dict[str, float]:
    """mean@n, pass@k and (with answers) maj@k averaged over prompts.

    scores: per prompt, its n samples' rewards (the same n for every prompt); answers: per
    prompt, each sample's extracted answer (None: none found). RL's held-out evaluation logs the
    same numbers as eval/*.
    """
    if not scores:
        return {}
    n = len(scores[0])
    correct = [[s >= threshold for s in row] for row in scores]
    out = {f"mean@{n}": sum(map(sum, scores)) / (n * len(scores))}
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in correct) / len(scores)
    if answers is not None:
        for k in ks:
            out[f"maj@{k}"] = sum(maj_at_k(a, c, k) for a, c in zip(answers, correct)) / len(scores)
    return out


def answer_extractor(reward_fn) -> Optional[Callable[[str], Optional[str]]]:
    """text -> normalised final answer, when the reward extracts answers (the math reward); else None."""
    extractors = getattr(reward_fn, "extractors", None)
    if not extractors:
        return None
    from rewards.math import extract_answer, normalize_answer

    def extract(text: str) -> Optional[str]:
        answer = extract_answer(text, extractors)
        return normalize_answer(answer) if answer else None

    return extract


# ----------------------------------------------------------------------------------- the model


def resolve_policy(path: str, base: str) -> tuple[str, Optional[str]]:
    """(model folder or hub id, LoRA adapter folder or None) of what `algo.model` names.

    A run folder with `final/` -> final/; a run folder with checkpoints -> its latest one; an
    RL checkpoint (`step_N/workers/<group>/actor`) -> the actor (an adapter on `base`, or a full
    model); a peft adapter folder -> the adapter on the base its config names when that folder
    exists, else on `base`; anything else is loaded as a Hugging Face causal LM.
    """
    p = Path(path)
    if (p / "final" / "config.json").is_file():
        return str(p / "final"), None
    if (p / "checkpoints").is_dir():
        from align.trainers.checkpoint import Checkpointer

        latest = Checkpointer(p).latest()
        if latest is None:
            raise FileNotFoundError(f"algo.model {path}: a run folder without final/ or a complete checkpoint")
        p = latest
    actors = sorted(p.glob("workers/*/actor"))
    if actors:
        p = actors[0]
    elif sorted(p.glob("workers/*/sharded")):
        raise FileNotFoundError(f"algo.model {path}: {p} was written sharded by data-parallel replicas (DCP), which "
                                "holds no whole actor; evaluate the run's final/ folder (its exported model)")
    if (p / ADAPTER_CONFIG).is_file():
        named = json.loads((p / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        return (named if named and os.path.isdir(named) else base), str(p)
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"algo.model {path}: not a model folder, LoRA adapter, run folder or checkpoint")
    return str(p), None  # a folder, or a hub id


def build_engine(cfg: RunConfig, path: str, stack: Any):
    """The rollout engine over the policy at `path` (`rollout.backend`: hf or vllm), and its tokenizer."""
    from align.models.loading import ensure_pad_token, load_causal_lm, load_tokenizer

    m, r = cfg.model, cfg.rollout
    model_dir, adapter = resolve_policy(path, m.name_or_path)
    has_tokenizer = adapter and any((Path(adapter) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(m.tokenizer or (adapter if has_tokenizer else model_dir),
                               trust_remote_code=m.trust_remote_code)
    if r.backend == "vllm":
        from rollout.vllm_engine import VLLMEngine

        if adapter:  # vLLM serves a plain folder: merge the adapter into a copy of its base
            from align.quantize import merge_adapter

            model_dir = merge_adapter(adapter, stack.enter_context(tempfile.TemporaryDirectory()), model_dir)
        engine = VLLMEngine(model_dir, tokenizer=m.tokenizer or model_dir, dtype=m.dtype, seed=cfg.seed,
                            gpu_memory_utilization=r.gpu_memory_utilization,
                            max_model_len=cfg.data.max_prompt_length + r.max_new_tokens)
        return engine, tokenizer
    from rollout.hf import HFEngine

    model = load_causal_lm(model_dir, dtype=m.dtype, device=m.device, trust_remote_code=m.trust_remote_code)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    ensure_pad_token(tokenizer, model)
    model.eval()
    return HFEngine(model, tokenizer, max_batch_size=cfg.algo.batch_size * cfg.algo.n,
                    fast_decode=r.fast_decode), tokenizer


def build_scorer(cfg: RunConfig, tokenizer) -> tuple[Callable[[list[dict], list], list[float]], Any]:
    """(prompt items, samples) -> rewards: the rule reward (`reward.name`) plus `model_weight`
    times the reward model's score (`reward.model_path`), as the RL drivers add them; and the
    rule reward itself (None without one)."""
    from rewards import get_reward

    rc = cfg.reward
    if not rc.name and not rc.model_path:
        raise ValueError("reward: set reward.name (a rule reward), reward.model_path (a reward model), or both")
    rule = get_reward(rc.name, **dict(rc.options)) if rc.name else None
    model_score = None
    if rc.model_path:
        from align.models.scorer import SequenceScorer, reward_model_kind

        if reward_model_kind(rc.model_path) == "classifier":
            scorer = SequenceScorer(rc.model_path, dtype=cfg.model.dtype, device=cfg.model.device)
            model_score = lambda items, samples: scorer.score(  # noqa: E731
                [x["source"] for x in items], [s.text for s in samples], [s.finish_reason == "stop" for s in samples])
        else:  # a reward role on the policy's base: it reads the policy's tokens
            from align.data import right_pad
            from align.evaluation.reward_model import load_pair_scorer

            score_ids, _ = load_pair_scorer(rc.model_path, cfg)

            def model_score(items, samples):
                rows = [x["prompt_ids"] + s.token_ids for x, s in zip(items, samples)]
                ids = right_pad(rows, tokenizer.pad_token_id)
                mask = right_pad([[1] * len(row) for row in rows], 0)
                with torch.no_grad():
                    return score_ids(ids, mask)

    def score(items: list[dict], samples: list) -> list[float]:
        total = torch.zeros(len(samples))
        if rule is not None:
            total += torch.tensor(rule([x["prompt"] for x in items], [s.text for s in samples],
                                       ground_truth=[x.get("ground_truth") for x in items]), dtype=torch.float32)
        if model_score is not None:
            total += rc.model_weight * model_score(items, samples)
        return total.tolist()

    return score, rule


# ---------------------------------------------------------------------------------- the stage


def evaluate_policy(cfg: RunConfig, examples: list, path: str, stats) -> tuple[dict, list[dict]]:
    """(summary, per-prompt rows) of the policy at `path` on the prompt `examples`."""
    import contextlib

    from tqdm.auto import tqdm

    from align.data import tokenize_prompts
    from rollout.base import SamplingParams

    algo, d, r = cfg.algo, cfg.data, cfg.rollout
    with contextlib.ExitStack() as stack:
        engine, tokenizer = build_engine(cfg, path, stack)
        items = tokenize_prompts(examples, tokenizer, d.max_prompt_length, overlong=d.overlong, stats=stats)
        score, rule = build_scorer(cfg, tokenizer)
        extract = answer_extractor(rule)
        common = dict(top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))
        rows: list[dict] = []
        for b, start in enumerate(tqdm(range(0, len(items), algo.batch_size), desc="eval", unit="batch",
                                       disable=not cfg.trainer.progress)):
            batch = items[start : start + algo.batch_size]
            prompts = [x["prompt_ids"] for x in batch]
            seed = (cfg.seed * 1_000_003 + b) % 2**31
            sampled = engine.generate(prompts, SamplingParams(n=algo.n, temperature=algo.temperature, seed=seed,
                                                              **common))
            greedy = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, **common)) if algo.greedy else None
            sample_scores = score([x for x in batch for _ in range(algo.n)], sampled.samples)
            greedy_scores = score(batch, greedy.samples) if greedy else None
            for i, x in enumerate(batch):
                group = sampled.samples[i * algo.n : (i + 1) * algo.n]
                rows.append(_prompt_row(start + i, x, group, sample_scores[i * algo.n : (i + 1) * algo.n], algo,
                                        extract, greedy.samples[i] if greedy else None,
                                        greedy_scores[i] if greedy else None))
    summary = summarize(rows, algo, maj=extract is not None)
    summary.update({"kind": "policy", "model": path, "reward": cfg.reward.name, "reward_model": cfg.reward.model_path})
    return summary, rows


def _prompt_row(index: int, item: dict, samples: list, scores: list[float], algo, extract, greedy,
                greedy_score) -> dict:
    """One eval.jsonl row: the prompt, its n responses with their rewards, answers and lengths."""
    correct = [s >= algo.threshold for s in scores]
    row = {"index": index, "prompt": item["prompt"], "ground_truth": item.get("ground_truth"), "n": algo.n,
           "n_correct": sum(correct), "scores": scores, "responses": [s.text for s in samples],
           "lengths": [len(s.token_ids) for s in samples], "truncated": [s.finish_reason == "length" for s in samples]}
    if extract is not None:
        row["answers"] = [extract(s.text) for s in samples]
    row.update({f"pass@{k}": pass_at_k(algo.n, row["n_correct"], k) for k in algo.k})
    if greedy is not None:
        row["greedy"] = {"response": greedy.text, "score": greedy_score, "correct": greedy_score >= algo.threshold,
                         "length": len(greedy.token_ids), "truncated": greedy.finish_reason == "length"}
        if extract is not None:
            row["greedy"]["answer"] = extract(greedy.text)
    return row


def summarize(rows: list[dict], algo, maj: bool) -> dict[str, Any]:
    """The aggregate of the per-prompt rows (summary.json's metrics)."""
    lengths = [n for row in rows for n in row["lengths"]]
    truncated = [t for row in rows for t in row["truncated"]]
    out: dict[str, Any] = {"prompts": len(rows), "n": algo.n, "k": list(algo.k), "temperature": algo.temperature,
                           "threshold": algo.threshold}
    out.update(sample_metrics([row["scores"] for row in rows], algo.threshold, algo.k,
                              [row["answers"] for row in rows] if maj else None))
    if rows and "greedy" in rows[0]:
        out["greedy"] = sum(row["greedy"]["correct"] for row in rows) / len(rows)
        out["greedy_reward"] = sum(row["greedy"]["score"] for row in rows) / len(rows)
    out["response_length"] = {"mean": statistics.fmean(lengths), "median": statistics.median(lengths),
                              "max": max(lengths)}
    out["truncated_frac"] = sum(truncated) / len(truncated)
    return out


def format_report(summary: dict) -> str:
    """One line per metric family, for the console."""
    metrics = {k: v for k, v in summary.items() if "@" in k}
    head = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    greedy = f"  greedy {summary['greedy']:.4f}" if "greedy" in summary else ""
    length = summary["response_length"]
    return (f"{summary['prompts']} prompts x {summary['n']} samples: {head}{greedy}\n"
            f"response length mean {length['mean']:.1f} (median {length['median']:.0f}, max {length['max']}), "
            f"truncated {summary['truncated_frac']:.3f}")
