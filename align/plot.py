"""Overlay the metrics of several runs in one PNG: one subplot per metric, one line per run.

    python -m align.plot runs/grpo runs/gspo                       # reward, KL, pass@k, loss, time/*
    python -m align.plot runs/a runs/b --x samples --metrics 'eval/*' loss -o compare.png

Reads each run's metrics.jsonl (and tracking.json for its name, config.json for samples per step).
The x axis is the optimizer step, or the samples seen: the running sum of the `samples` column
where the trainer logs one (RL: completions per step), else step x batch_size x grad_accum.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from pathlib import Path
from typing import Sequence

# What a reader looks at first, in this order; each a glob over the logged metric names.
DEFAULT_METRICS = ("reward/mean", "eval/reward", "eval/pass@*", "*kl*", "loss", "*/loss", "val_loss", "val/loss",
                   "time/*")


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run's output_dir?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_name(run_dir: Path) -> str:
    """The tracker run name recorded in tracking.json, else the folder's name."""
    tracking = run_dir / "tracking.json"
    if tracking.exists():
        return json.loads(tracking.read_text()).get("run_name") or run_dir.resolve().name
    return run_dir.resolve().name


def samples_seen(run_dir: Path, rows: list[dict]) -> dict[int, float]:
    """Samples seen by the end of each step: the running sum of `samples` where logged, else
    step x batch_size x grad_accum from the run's config.json."""
    per_step = {r["step"]: r["samples"] for r in rows if isinstance(r.get("samples"), (int, float))}
    steps = sorted({r["step"] for r in rows})
    if not per_step:
        config = run_dir / "config.json"
        if not config.exists():
            raise ValueError(f"{run_dir}: no `samples` metric and no config.json to count samples per step; "
                             "use --x step")
        trainer = json.loads(config.read_text())["trainer"]
        return {s: float(s * trainer["batch_size"] * trainer["grad_accum"]) for s in steps}
    seen, total = {}, 0.0
    for s in steps:
        total += per_step.get(s, 0.0)
        seen[s] = total
    return seen


def pick_metrics(runs: Sequence[list[dict]], patterns: Sequence[str]) -> list[str]:
    """The metric names with a finite value in some run matching `patterns`, in pattern order, each once."""
    logged = sorted({k for rows in runs for r in rows for k, v in r.items()
                     if k not in ("step", "time", "samples") and isinstance(v, (int, float)) and math.isfinite(v)})
    picked: list[str] = []
    for pattern in patterns:
        picked += [k for k in logged if fnmatch.fnmatchcase(k, pattern) and k not in picked]
    return picked


def plot_runs(run_dirs: Sequence[str | Path], x: str = "step", metrics: Sequence[str] | None = None):
    """A matplotlib Figure: one subplot per metric (titled with its name), one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in ("step", "samples"):
        raise ValueError(f"--x: {x!r} is not one of ['step', 'samples']")
    dirs = [Path(d) for d in run_dirs]
    runs = [_rows(d) for d in dirs]
    names = [run_name(d) for d in dirs]
    if len(set(names)) < len(names):  # two runs named alike: tell them apart by their paths
        names = [str(d) for d in dirs]
    xs = [samples_seen(d, rows) if x == "samples" else {r["step"]: r["step"] for r in rows}
          for d, rows in zip(dirs, runs)]
    keys = pick_metrics(runs, metrics or DEFAULT_METRICS)
    if not keys:
        raise ValueError(f"no logged metric matches {list(metrics or DEFAULT_METRICS)} in {[str(d) for d in dirs]}")
    cols = min(4, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for rows, to_x, name in zip(runs, xs, names):
            points = [(to_x[r["step"]], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                ax.plot(*zip(*points), marker="o" if len(points) <= 30 else None, markersize=3, label=name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("samples seen" if x == "samples" else "step")
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m align.plot", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run output directories (each with a metrics.jsonl)")
    parser.add_argument("--x", choices=("step", "samples"), default="step", help="x axis: step or samples seen")
    parser.add_argument("--metrics", nargs="+", help=f"metric names or globs (default: {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("-o", "--output", default="plot.png", help="the PNG to write (default: plot.png)")
    args = parser.parse_args(argv)
    fig = plot_runs(args.runs, x=args.x, metrics=args.metrics)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    print(out)
    return out


if __name__ == "__main__":
    main()
