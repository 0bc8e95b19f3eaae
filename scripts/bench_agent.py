"""GRPO on a multi-turn environment, the longer version of the CI learning test
(tests/trainers/rl/test_grpo_env.py): held-out success before and after, and a plot of turns,
tool-call validity (tool environments) and reward over the steps.

    python scripts/bench_agent.py                          # guess_number 1..2, stories260K + LoRA, 40 steps
    python scripts/bench_agent.py --steps 10 --quick       # smoke run
    python scripts/bench_agent.py --env calculator --data gsm8k --model Qwen/Qwen2.5-0.5B-Instruct -- rollout=vllm

Prints ONE JSON object: {"env", "steps", "eval_success_before", "eval_success_after",
"eval_reward_before", "eval_reward_after", "seconds_per_step", "final": {last step's env/*},
"plot": path, "output_dir", "machine": {...}}. Extra Hydra overrides follow `--`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="guess_number")
    parser.add_argument("--data", default="story_prompts")
    parser.add_argument("--model", default=None, help="model.name_or_path (default: the shipped stories260K)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a tiny batch, for a smoke run")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from align.config import compose
    from align.plot import plot_runs
    from align.trainers.grpo import train
    from align.trainers.metrics import read_metrics

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="bench-agent-"))
    overrides = [
        "algo=grpo", f"data={args.data}", f"env={args.env}", f"output_dir={out}", "trainer.progress=false",
        f"trainer.max_steps={args.steps}", f"trainer.eval_every={args.eval_every}", f"trainer.save_every={args.steps}",
        "trainer.num_threads=1", "seed=0",
    ]
    if args.env == "guess_number" and args.model is None:  # what stories260K can learn (the CI test's setting)
        overrides += ["env.options.high=2", "env.max_turns=2", "env.max_total_tokens=96", "rollout.max_new_tokens=6",
                      "algo.rollout_batch_size=4", "algo.num_generations=8", "algo.eval_prompts=32",
                      "algo.eval_samples=2"]
    if args.model:
        overrides += ["model=hf", f"model.name_or_path={args.model}"]
    if args.quick:
        overrides += ["algo.rollout_batch_size=2", "algo.num_generations=4", "algo.eval_prompts=8"]
    cfg, hydra_cfg = compose(overrides + list(args.overrides))
    t0 = time.perf_counter()
    summary = train(cfg, hydra_cfg)
    wall = time.perf_counter() - t0

    rows = read_metrics(out)
    metrics = ["env/turns", "env/success", "env/tool_validity", "env/tool_calls", "reward/mean", "eval/success",
               "eval/reward", "response_length"]
    fig = plot_runs([out], metrics=[m for m in metrics if any(m in r for r in rows)])
    plot = out / "agent.png"
    fig.savefig(plot, dpi=110)
    evals = [r for r in rows if "eval/success" in r]
    last = next(r for r in reversed(rows) if "env/turns" in r)
    result = {
        "env": args.env, "steps": args.steps,
        "eval_success_before": evals[0]["eval/success"], "eval_success_after": evals[-1]["eval/success"],
        "eval_reward_before": summary["eval_reward_before"], "eval_reward_after": summary["eval_reward_after"],
        "seconds_per_step": summary["seconds_per_step"].get("step"), "wall_seconds": wall,
        "final": {k: v for k, v in last.items() if k.startswith("env/")},
        "plot": str(plot), "output_dir": str(out),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
