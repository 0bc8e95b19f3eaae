"""The evaluation stage: `python -m align algo=eval ...` (configs/algo/eval.yaml).

    python -m align algo=eval data=gsm8k_test reward=math algo.n=8 algo.k=[1,4,8] algo.model=runs/grpo/final
    python -m align algo=eval data=hh_pairs algo.model=runs/rm/reward_model

Prompt data (formats prompt, prompt_answer): the policy at `algo.model` samples `algo.n`
responses per prompt (plus a greedy one), the configured reward scores them, and
`align.evaluation.policy` reports mean@n, pass@k, maj@k, greedy accuracy, response lengths and
the truncated fraction. Pair data (formats hh, pairwise): the reward model at `algo.model` scores
both responses of every pair (`align.evaluation.reward_model`).

1. read `data.source` (the whole file, or one side of the trainers' split: `algo.split`);
2. evaluate, batched, with a progress bar;
3. write `eval.jsonl` (one row per prompt or pair) and `summary.json` into `output_dir`, as
   lm-evaluation-harness writes its per-sample file and its aggregate results.
"""

from __future__ import annotations

import json
import time
from typing import Any

from align.config import EvalConfig, RunConfig

PAIR_FORMATS = ("hh", "pairwise")
PROMPT_FORMATS = ("prompt", "prompt_answer")


def read_examples(cfg: RunConfig, stats) -> list:
    """The examples `algo.split` selects from `data.source`; bad rows and the like counted in `stats`."""
    from align.data import build_split, load_examples

    d = cfg.data
    if d is None:
        raise ValueError("algo=eval needs data: e.g. data=gsm8k_test (prompts) or data=hh_pairs (pairs)")
    if d.format not in PAIR_FORMATS + PROMPT_FORMATS:
        raise ValueError(f"data.format: algo=eval reads prompts {list(PROMPT_FORMATS)} or preference pairs "
                         f"{list(PAIR_FORMATS)}, not {d.format!r}")
    kw = dict(columns=dict(d.columns), on_error=d.on_error, split=d.split, stats=stats)
    if cfg.algo.split == "all":
        examples = load_examples(d.source, d.format, limit=d.limit, **kw)
    else:
        train, val = build_split(d.source, d.format, val_fraction=d.val_fraction, val_size=d.val_size, seed=d.seed,
                                 limit=d.limit, **kw)
        examples = val if cfg.algo.split == "val" else train
    if not examples:
        raise ValueError(f"data.source {d.source}: nothing to evaluate (algo.split={cfg.algo.split}); "
                         f"{stats.summary()}")
    return examples


def train(cfg: RunConfig, hydra_cfg=None) -> dict[str, Any]:
    """Evaluate as configured; returns the summary (also written to summary.json)."""
    from align.data import DataStats
    from align.trainers.common import prepare_output_dir, seed_everything, set_threads

    algo = cfg.algo
    assert isinstance(algo, EvalConfig)
    out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
    set_threads(cfg.trainer.num_threads)
    seed_everything(cfg.seed)
    path = algo.model or cfg.model.name_or_path
    t0 = time.perf_counter()
    stats = DataStats()
    examples = read_examples(cfg, stats)
    if cfg.data.format in PAIR_FORMATS:
        from align.evaluation.reward_model import evaluate_reward_model, format_report

        summary, rows = evaluate_reward_model(cfg, examples, path, stats)
    else:
        from align.evaluation.policy import evaluate_policy, format_report

        summary, rows = evaluate_policy(cfg, examples, path, stats)
    summary = {"algo": "eval", **summary, "source": cfg.data.source, "split": algo.split,
               "data": stats.as_dict(), "seconds": time.perf_counter() - t0,
               "output_dir": str(out)}
    with open(out / "eval.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(format_report(summary), flush=True)
    return summary
