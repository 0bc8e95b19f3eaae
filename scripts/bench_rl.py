"""GRPO and PPO on stories260K with the story reward, longer than the CI learning tests.

    python scripts/bench_rl.py                         # both, 40 iterations each
    python scripts/bench_rl.py --algos grpo --steps 60 --override rollout.max_new_tokens=48

Writes the held-out and training reward curves as a PNG, and prints one JSON object: the
held-out mean reward of the initial and final policy, mean seconds per step by phase
(generate, reward, reference, values, update, sync), wall time, and the machine. Runs every
driver in this process on one local Ray cluster (address=local, no dashboard).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_algo(algo: str, steps: int, out: Path, eval_every: int, overrides: list[str]) -> dict:
    from align.config import compose
    from align.trainers import run

    cfg, hydra_cfg = compose([f"algo={algo}", f"output_dir={out / algo}", f"trainer.max_steps={steps}",
                              f"trainer.eval_every={eval_every}", f"trainer.save_every={steps}",
                              "trainer.progress=false", "trainer.resume=never", *overrides])
    t0 = time.perf_counter()
    summary = run(cfg, hydra_cfg)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


def plot(out: Path, algos: list[str]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.trainers.metrics import read_metrics

    fig, axes = plt.subplots(1, len(algos), figsize=(5.5 * len(algos), 4), squeeze=False)
    for ax, algo in zip(axes[0], algos):
        rows = read_metrics(out / algo)
        train = [(r["step"], r["reward/mean"]) for r in rows if "reward/mean" in r]
        held = [(r["step"], r["eval/reward"]) for r in rows if "eval/reward" in r]
        ax.plot(*zip(*train), alpha=0.5, label="training batch (sampled)")
        ax.plot(*zip(*held), marker="o", label="held-out prompts (fixed seed)")
        ax.set_title(f"{algo.upper()} on stories260K, story reward")
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean reward")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    path = out / "reward_curves.png"
    fig.savefig(path, dpi=110)
    return path


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.is_available()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", default=["grpo", "ppo"], choices=["grpo", "ppo"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--out", default="runs/bench_rl")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override, repeatable")
    args = parser.parse_args()

    from align.workers.testing import local_ray

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with local_ray(num_cpus=args.num_cpus or len(os.sched_getaffinity(0))):
        for algo in args.algos:
            s = run_algo(algo, args.steps, out, args.eval_every, args.override)
            results[algo] = {
                "steps": s["steps"],
                "heldout_reward_initial": s["eval_reward_before"],
                "heldout_reward_final": s["eval_reward_after"],
                "seconds_per_step": {k: round(v, 4) for k, v in s["seconds_per_step"].items()},
                "wall_s": s["wall_s"],
            }
    report = {"bench": "rl", **results, "reward_curves_png": str(plot(out, args.algos)), "machine": machine(),
              "overrides": args.override}
    (out / "bench_rl.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
