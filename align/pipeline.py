"""The whole pipeline on the embedded default, as one command:

    python -m align algo=pipeline            # what `make demo` runs (configs/algo/pipeline.yaml)

    1. sft       stories260K, supervised on HH-RLHF helpful dialogues (prompt tokens masked)
    2. rm        a reward LoRA adapter + score head on the SFT model, Bradley-Terry on HH pairs
    3. dpo       DPO from the SFT model on HH pairs (reference = adapters off)
    4. grpo      GRPO from stories260K with the story reward (the model writes stories: RL on
                 HH-style dialogue would reward nothing it can do), evaluated (algo=eval) before
                 and after on its held-out prompts: mean@n, pass@k, greedy
    5. quantize  the GRPO actor, merged into its base, quantized to int8 weight-only
    6. serve     the quantized model behind our OpenAI-compatible API on 127.0.0.1; one query

Each stage is an ordinary run (`python -m align algo=<stage> ...`) composed with the overrides
in `algo.overrides.<stage>` and writing into `<output_dir>/<stage>/`; the pipeline adds only
the hand-over between stages (which model folder the next one starts from). At the end it
prints a table of each stage's headline metric and writes `curves.png` (loss and reward curves)
and `summary.json` into the output directory.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from align.config import compose
from align.trainers.common import prepare_output_dir
from align.trainers.metrics import read_metrics

STAGES = ("sft", "rm", "dpo", "grpo", "quantize", "serve")


def _tracking_overrides(trainer, out: Path) -> list[str]:
    """Every stage logs where the pipeline does, as one W&B group (the pipeline's run name)."""
    def quoted(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return [f"trainer.loggers=[{','.join(trainer.loggers)}]", f"trainer.project={quoted(trainer.project)}",
            f"trainer.group={quoted(trainer.group or trainer.run_name or out.resolve().name)}",
            f"trainer.tags=[{','.join(quoted(t) for t in trainer.tags)}]"]


def _stage_overrides(cfg, stage: str, out: Path, products: dict[str, str]) -> list[str]:
    """The Hydra overrides of one stage: its own, plus the folder it starts from."""
    algo = cfg.algo
    extra = [f"algo={stage}", f"output_dir={out / stage}", f"seed={cfg.seed}", *_tracking_overrides(cfg.trainer, out)]
    if stage in ("rm", "dpo") and "sft" in products:
        extra.append(f"model.name_or_path={products['sft']}")
    if stage == "quantize":
        extra.append(f"algo.input={products.get('grpo') or products.get('sft')}")
    return extra + list(algo.overrides.get(stage, []))


RL_STAGES = ("grpo", "ppo")
# Overrides of an RL stage that its evaluation shares: which data, model, reward and sampling.
EVAL_SHARED = ("data", "model", "reward", "rollout", "+data", "+model", "+reward", "+rollout")


def _eval_overrides(cfg, stage: str, rl_overrides: list[str], model: str, out: Path, when: str) -> list[str]:
    """`algo=eval` of `model` on the RL stage's held-out prompts (`algo.split=val`, the RL
    stage's own split), with its data, reward and sampling settings."""
    shared = [o for o in rl_overrides if o.split("=", 1)[0].split(".", 1)[0] in EVAL_SHARED]
    return ["algo=eval", *shared, f"output_dir={out / f'{stage}_eval_{when}'}", f"seed={cfg.seed}",
            "algo.split=val", f"algo.model={model}", *cfg.algo.eval_overrides]


def run_stage(stage: str, overrides: list[str]) -> tuple[dict[str, Any], float]:
    """One stage in this process, exactly as `python -m align <overrides>` would run it."""
    from align.trainers import run

    cfg, raw = compose(overrides)
    t0 = time.perf_counter()
    summary = run(cfg, raw)
    return summary, time.perf_counter() - t0


def _product(stage: str, stage_dir: Path, summary: dict) -> str | None:
    """The model folder a stage hands to the next one."""
    for candidate in (summary.get("export_dir"), stage_dir / "final", stage_dir / "quantized"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return None


def serve_query(model_dir: str, prompt: str, max_tokens: int = 48) -> dict[str, Any]:
    """Start our OpenAI-compatible server on a free loopback port in this process, send one
    `/v1/completions` request over HTTP, stop the server; returns the reply and timings."""
    import uvicorn

    from align.serve import CompletionService, ServeSettings, create_app

    settings = ServeSettings(model=model_dir, served_name="align-demo")
    app = create_app(CompletionService.from_settings(settings))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 60
        while not server.started:
            if time.time() > deadline or not thread.is_alive():
                raise RuntimeError("the demo server did not start")
            time.sleep(0.05)
        body = json.dumps({"model": "align-demo", "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=120) as resp:
            reply = json.loads(resp.read())
        return {"prompt": prompt, "completion": reply["choices"][0]["text"],
                "finish_reason": reply["choices"][0]["finish_reason"],
                "seconds": time.perf_counter() - t0, "url": f"http://127.0.0.1:{port}/v1"}
    finally:
        server.should_exit = True
        thread.join(timeout=30)


# What the summary table shows for each stage: (label, key before, key after).
HEADLINES = {
    "sft": ("validation loss", "val_loss_before", "val_loss_after"),
    "rm": ("held-out pair accuracy", "val_before.accuracy", "val_after.accuracy"),
    "dpo": ("held-out reward accuracy", "val_before.rewards/accuracy", "val_after.rewards/accuracy"),
    "grpo": ("held-out story reward", "eval_reward_before", "eval_reward_after"),
    "ppo": ("held-out story reward", "eval_reward_before", "eval_reward_after"),
    "quantize": ("held-out perplexity", "ppl_before", "ppl_after"),
}


def eval_row(stage: str, before: dict, after: dict, seconds: float) -> dict:
    """The summary-table row of an RL stage's evaluations (mean@n), with every metric's change printed."""
    metrics = [k for k in before if "@" in k] + ["greedy"] * ("greedy" in before)
    print(f"eval before -> after {stage}: " + ", ".join(
        f"{k} {before[k]:.4f} -> {after[k]:.4f} ({after[k] - before[k]:+.4f})" for k in metrics), flush=True)
    mean = f"mean@{before['n']}"
    return {"stage": "eval", "metric": f"{stage} held-out {mean}", "before": before[mean], "after": after[mean],
            "seconds": seconds}


def _lookup(summary: dict, path: str | None) -> Any:
    value: Any = summary
    for part in (path or "").split(".") if path else []:
        value = value.get(part) if isinstance(value, dict) else None
    return value if path else None


def headline(stage: str, summary: dict) -> tuple[str, Any, Any]:
    label, before, after = HEADLINES.get(stage, (stage, None, None))
    return label, _lookup(summary, before), _lookup(summary, after)


def summary_table(rows: list[dict]) -> str:
    lines = [f"{'stage':<9} {'headline metric':<26} {'before':>10} {'after':>10} {'seconds':>8}", "-" * 67]
    for r in rows:
        fmt = lambda v: f"{v:10.4f}" if isinstance(v, (int, float)) else f"{'-':>10}"  # noqa: E731
        lines.append(f"{r['stage']:<9} {r['metric']:<26} {fmt(r['before'])} {fmt(r['after'])} {r['seconds']:8.1f}")
    return "\n".join(lines)


# Curves to draw per stage: metrics.jsonl keys, first one present wins per panel line.
CURVES = {
    "sft": ["loss", "val_loss"],
    "rm": ["loss", "val/accuracy"],
    "dpo": ["loss", "val/rewards/accuracy"],
    "grpo": ["reward/mean", "eval/reward"],
    "ppo": ["reward/mean", "eval/reward"],
}


def plot_curves(out: Path, stages: list[str]) -> Path | None:
    """One panel per trained stage with its loss and reward curves, as `curves.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [s for s in stages if s in CURVES and (out / s / "metrics.jsonl").exists()]
    if not drawn:
        return None
    fig, axes = plt.subplots(1, len(drawn), figsize=(4.2 * len(drawn), 3.4), squeeze=False)
    for ax, stage in zip(axes[0], drawn):
        rows = read_metrics(out / stage)
        for key in CURVES[stage]:
            points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) < 12 else None, markersize=3, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def train(cfg, hydra_cfg=None) -> dict:
    """Run the configured stages in order; print the summary table; write curves.png."""
    algo = cfg.algo
    out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
    products: dict[str, str] = {}
    rows, results = [], {}
    t_start = time.perf_counter()
    for stage in algo.stages:
        print(f"\n=== pipeline: {stage} ===", flush=True)
        if stage == "serve":
            model_dir = products.get("quantize") or products.get("grpo") or products.get("sft")
            t0 = time.perf_counter()
            reply = serve_query(model_dir, algo.serve_prompt)
            print(f"served query: {reply['prompt']!r} -> {reply['completion']!r}")
            results[stage] = reply
            rows.append({"stage": stage, "metric": "served query (s)",
                         "before": None, "after": reply["seconds"], "seconds": time.perf_counter() - t0})
            continue
        overrides = _stage_overrides(cfg, stage, out, products)
        evaluate = algo.eval_rl and stage in RL_STAGES
        if evaluate:  # the policy the RL stage starts from
            start = compose(overrides)[0].model.name_or_path
            eval_before, seconds_before = run_stage("eval",
                                                    _eval_overrides(cfg, stage, overrides, start, out, "before"))
        summary, seconds = run_stage(stage, overrides)
        results[stage] = summary
        product = _product(stage, out / stage, summary)
        if product:
            products[stage] = product
        label, before, after = headline(stage, summary)
        rows.append({"stage": stage, "metric": label, "before": before, "after": after, "seconds": seconds})
        if evaluate:
            eval_after, seconds_after = run_stage("eval", _eval_overrides(cfg, stage, overrides, product, out, "after"))
            results[f"{stage}_eval"] = {"before": eval_before, "after": eval_after}
            rows.append(eval_row(stage, eval_before, eval_after, seconds_before + seconds_after))
    plot = plot_curves(out, list(algo.stages))
    table = summary_table(rows)
    total = time.perf_counter() - t_start
    print("\n" + table + f"\n\ntotal {total:.0f} s; curves: {plot}; outputs: {out}")
    summary = {"algo": "pipeline", "stages": rows, "results": results, "products": products,
               "curves": str(plot) if plot else None, "seconds": total, "output_dir": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.txt").write_text(table + "\n")
    return summary
