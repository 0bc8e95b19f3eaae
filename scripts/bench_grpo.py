"""Seconds per GRPO step: our Ray driver (align.trainers.grpo) against TRL's GRPOTrainer, on CPU.

    python scripts/bench_grpo.py                 # stories260K + LoRA, 8 prompts x G=8, 64 new tokens
    python scripts/bench_grpo.py --repeats 3     # three back-to-back pairs, order alternated
    python scripts/bench_grpo.py --quick         # smoke run: tiny batch, 2 timed steps
    python scripts/bench_grpo.py --workload gsm8k   # GSM8K questions (~139 tokens) + math reward

Prints one JSON object: {"ours": {seconds_per_step, cpu_seconds_per_step, steps, phases, ...},
"trl": {...}, "speedup": TRL seconds per step / ours, "cpu_speedup": the same for CPU seconds,
"settings": {...}, "machine": {...}}; with --repeats N also "runs" (every pair's figures),
"speedups" and "cpu_speedups", and the top-level figures are the medians.

What is compared, kept equal on both sides:
- model: stories260K in float32 on CPU; LoRA r 8, alpha 16, dropout 0, every linear layer but
  the LM head (TRL: `peft_config`), or full fine-tuning with `--finetune full`;
- prompts (`--workload`): `story`, our story prompts' train split (~19 tokens), or `gsm8k`, the
  GSM8K train questions (~139 tokens; over 256 dropped). The same list on both sides, read
  through our data layer; TRL tokenises the text itself and adds BOS as ours does (the ids are
  equal). `--prompts-per-step` of them per step, `--num-generations` samples each, at most
  `--max-new-tokens` new tokens, temperature `--temperature`, top-p 1, no top-k;
- reward: `rewards.get_reward("story")` or `("math")` (ground truth passed as a dataset column
  to TRL), wrapped in TRL's `reward_funcs` signature. stories260K cannot do arithmetic, so the
  gsm8k rewards are 0 on both sides: that workload measures the cost of a math-RL step only;
- objective: group-normalised advantages (ours `grpo`, TRL `scale_rewards="group"`), clipped
  surrogate with epsilon 0.2 / 0.28 (clip-higher), token-mean aggregation (TRL `dapo`), k3 KL to
  the reference with coefficient `--beta` (LoRA: adapters off on both sides; full: a frozen copy);
- one optimizer step per generation batch: the whole batch is one micro-batch (ours
  trainer.batch_size, TRL per_device_train_batch_size = prompts x G, no accumulation,
  num_iterations 1), so neither side recomputes old log-probs; AdamW at `--lr`, constant
  schedule, gradient clipping at 1.0, no gradient checkpointing;
- no evaluation and no checkpoint inside the timed steps; ours writes its metrics.jsonl line per
  step as always, TRL logs every step to nowhere (`report_to="none"`);
- threads: `--threads` torch threads on both sides (TRL's process; our Ray worker, which does all
  the model work; our driver too). Each framework runs in its own subprocess, one after the other.

Timing: a step costs what passes from the end of the previous step to the end of this one (ours:
stamped on entry to `RLRun.end_step`, which this script wraps, before any evaluation or checkpoint;
TRL: `on_step_end`), so framework overhead is counted. The first `--warmup` steps are left out;
figures are medians over the rest. Two clocks:
- seconds_per_step: wall time, the issue's figure. On a shared, oversubscribed machine it mostly
  measures how long each process waited for a core, and swings 2x between runs;
- cpu_seconds_per_step: CPU seconds used by the benchmark process and all its descendants (ours:
  driver, Ray's GCS, raylet and agents, and the worker; `worker_cpu_seconds_per_step` is the
  worker alone). It barely moves with the load, so `cpu_speedup` is the steadier comparison.
Phases: ours are the driver's wall times from metrics.jsonl (time/generate, reward, reference,
update, sync; `other` = wall minus their sum); TRL's come from timers wrapped around its methods
(generate = `_generate_single_turn`, reward = `_calculate_rewards`, prepare = the rest of
`_generate_and_score_completions`, which holds the reference pass; update = the remainder: loss
forward, backward, optimizer step), in wall (`phases`) and CPU seconds (`phases_cpu`).
Start-up (Ray, workers, model loading) is outside the steps; `total_seconds` shows it.

Measured (defaults, one thread, 2-core shared CPU whose step times swing 1.4-2.4 s for the same
work; transformers 5.24, TRL 1.16, 2026-11-29):

    workload  ours s/step  TRL s/step  speedup (wall)      CPU speedup          (repeats)
    story     1.60-1.78    2.84-3.09   1.75 (1.68-1.82)    1.61 (1.56-1.67)     4 pairs, quiet host
    gsm8k     2.88-3.12    9.75-10.57  3.30 (3.29-3.68)    3.10 (3.10-3.42)     3 pairs

Two more story runs of 3 pairs: 1.89 (1.48-1.94) at load ~1, and 1.50 (1.35-1.77) with a test
suite running beside it, which is what the host's noise does to a single pair.
`--mixed`: GSM8K prompts (at most 192 tokens) with long-tailed answers (`--max-new-tokens 320`,
the rest of stories260K's 512-token context; ours stopping at the first '"', see MIXED_STOP; TRL's
side has no stop string, so its samples run to the cap) and a third run, `ours_packed`, with
padding-free packing and token-budget micro-batches (`trainer.max_tokens_per_micro`,
`--max-tokens-per-micro`, 32,768: one micro-batch per step). Packed, the shared-prompt pass runs
each prompt once into a KV cache and its G responses packed into rows over it (roles.py
`pack_group_responses`), so neither the prompt repeats nor the responses pad to the longest.
`packing_speedup`: ours / ours_packed seconds per step (generation, which packing does not touch,
included); `packing_speedup_update`: the same over the reference pass + update phases only, which
is the training tokens/s ratio (both runs sample the same responses: same seed, same engine).

Measured (`--mixed --steps 3 --warmup 1`, 8 prompts x G=8, responses mean 96 tokens of at most
320; one thread, 2-core CPU, load 0.9 -> 2.3, 2026-12-06): ours 10.08 s/step (reference 1.31 s,
update 5.70 s), ours_packed 6.65 s/step (0.66, 2.29), TRL 18.38 s/step: **packing_speedup_update
2.38** (target >= 1.3), packing_speedup 1.52 (generation 3.41 vs 3.68 s), ours packed 2.76x TRL
(TRL's samples run to 320 tokens). A second run (load 0.8 -> 1.0): ours 8.27 s/step (1.21, 4.38),
ours_packed 5.03 (0.51, 1.82), TRL 13.63: packing_speedup_update 2.39, packing_speedup 1.64,
2.71x TRL. The previous workload (answers stopped at the first "!" and
capped at 256: mean 185, 70% of the cap) left packing nothing to remove, and the padding-free
path then repeated every prompt G times: 0.73-0.89x.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)

# LoRA settings shared by both sides (configs/model/stories260k_lora.yaml).
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}
CLIP_LOW, CLIP_HIGH = 0.2, 0.28
# Prompt sets: (data overrides, reward, default max prompt tokens, what the settings report).
WORKLOADS = {
    "story": ([], "story", 64, "configs/data/story_prompts.jsonl (train split), ~19 tokens"),
    "gsm8k": (["data=gsm8k", "data.overlong=drop"], "math", 256, "GSM8K train questions, ~139 tokens (longer dropped)"),
}


# --mixed: stories260K cannot answer GSM8K and rarely ends a sample by itself, so every response
# would run to the cap. Stopping at its first '"' (the opening of a quote in its stories) gives
# the long-tailed lengths of math RL, where most answers are short and a few run to the cap (64
# samples at 320 new tokens: mean ~96, median ~60, a tenth at the cap; real GSM8K RL with a
# 1,024-token cap has mean/max ~0.3 as here).
MIXED_STOP = '"'


def our_overrides(args, output_dir: str) -> list[str]:
    """The Hydra overrides of our run (also used by the TRL side to read the same prompt list)."""
    rows = args.prompts_per_step * args.num_generations
    never = args.warmup + args.steps + 1
    return [
        "algo=grpo", *WORKLOADS[args.workload][0], f"reward.name={WORKLOADS[args.workload][1]}",
        f"model.name_or_path={args.model}", f"model.finetune={args.finetune}",
        f"model.lora.r={LORA['r']}", f"model.lora.alpha={LORA['alpha']}", f"model.lora.dropout={LORA['dropout']}",
        f"model.lora.target_modules={LORA['target_modules']}",
        f"algo.rollout_batch_size={args.prompts_per_step}", f"algo.num_generations={args.num_generations}",
        "algo.advantage_estimator=grpo", f"algo.kl_coef={args.beta}", "algo.kl_kind=k3",
        f"algo.clip_eps_low={CLIP_LOW}", f"algo.clip_eps_high={CLIP_HIGH}", "algo.loss_agg=token-mean",
        "algo.ppo_epochs=1", "algo.minibatch_size=null", "algo.filter_zero_variance=false",
        "algo.eval_prompts=0", f"algo.forward_batch_size={rows}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={args.temperature}",
        "rollout.top_p=1.0", "rollout.top_k=-1",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"trainer.max_steps={args.warmup + args.steps}", f"trainer.batch_size={rows}", f"trainer.lr={args.lr}",
        "trainer.weight_decay=0.0", "trainer.lr_scheduler=constant", "trainer.warmup_steps=0",
        "trainer.max_grad_norm=1.0", f"trainer.eval_every={never}", f"trainer.save_every={never}",
        f"trainer.num_threads={args.threads}", "trainer.progress=false", "trainer.resume=never",
        f"cluster.num_cpus_per_worker={args.threads}", f"cluster.num_cpus={args.threads}", "cluster.num_replicas=1",
        f"seed={args.seed}", f"output_dir={output_dir}",
    ] + ([f"trainer.max_tokens_per_micro={args.max_tokens_per_micro}"] if args.worker == "ours_packed" else []) + (
        [f"rollout.stop=[{MIXED_STOP!r}]"] if args.mixed else [])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tree_cpu_seconds(pids: tuple[int, ...] = ()) -> tuple[float, dict[int, float]]:
    """CPU seconds (user + system) used so far by this process and every live descendant (our Ray
    cluster: GCS, raylet, workers), and by each of `pids`. CPU time is what a step costs whatever
    the machine's load; wall time on a shared, oversubscribed machine mostly measures the queue."""
    import psutil

    me = psutil.Process()
    total, each = 0.0, {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += t.user + t.system
        if proc.pid in pids:
            each[proc.pid] = t.user + t.system
    return total, each


class StepStamps:
    """Wall clock and CPU seconds at the end of every step; a step's cost is the difference from
    the previous step's stamp, so everything between two step ends is counted."""

    def __init__(self):
        self.wall, self.cpu, self.worker_cpu = {}, {}, {}

    def take(self, step: int, worker_pids: tuple[int, ...] = ()) -> None:
        self.wall[step] = time.perf_counter()
        self.cpu[step], each = tree_cpu_seconds(worker_pids)
        self.worker_cpu[step] = sum(each.values())

    def timed(self, first: int, last: int) -> dict:
        """Median seconds per step over steps first..last (each needs the previous step's stamp)."""
        steps = range(first, last + 1)
        wall = [self.wall[s] - self.wall[s - 1] for s in steps]
        cpu = [self.cpu[s] - self.cpu[s - 1] for s in steps]
        out = {"seconds_per_step": statistics.median(wall), "cpu_seconds_per_step": statistics.median(cpu),
               "steps": len(wall), "step_seconds": [round(x, 3) for x in wall],
               "step_cpu_seconds": [round(x, 3) for x in cpu]}
        if any(self.worker_cpu.values()):
            out["worker_cpu_seconds_per_step"] = statistics.median(
                self.worker_cpu[s] - self.worker_cpu[s - 1] for s in steps)
        return out


class WorkerPeakRSS(threading.Thread):
    """Polls the peak resident memory (VmHWM) of our Ray workers, whose pids the run writes to
    workers.json once they are up; the last reading before they exit is their peak."""

    def __init__(self, output_dir: str):
        super().__init__(daemon=True)
        self.path, self.peak_mb, self.stop = Path(output_dir) / "workers.json", {}, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                for w in json.loads(self.path.read_text()):
                    for line in Path(f"/proc/{w['pid']}/status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_mb[w["name"]] = int(line.split()[1]) / 1024
            except (OSError, ValueError, KeyError):  # not written yet, or the worker has exited
                continue


def run_ours(args, scratch: str) -> dict:
    """Our driver end to end (align.trainers.grpo.train). Each step is stamped as it enters
    `RLRun.end_step` (wrapped here, before any evaluation or checkpoint); phases from metrics.jsonl."""
    from align.config import compose
    from align.trainers import rl
    from align.trainers.grpo import train
    from align.trainers.metrics import read_metrics

    stamps, end_step = StepStamps(), rl.RLRun.end_step

    def stamped_end_step(run, step, *a, **k):
        stamps.take(step, tuple(w["pid"] for g in run.placement.unique_groups() for w in g.workers_info))
        return end_step(run, step, *a, **k)

    rl.RLRun.end_step = stamped_end_step
    out = os.path.join(scratch, "run")
    cfg, _ = compose(our_overrides(args, out))
    rss = WorkerPeakRSS(out)
    rss.start()
    t0 = time.perf_counter()
    train(cfg)
    total = time.perf_counter() - t0
    rss.stop.set()
    rss.join()
    first, last = args.warmup + 1, args.warmup + args.steps
    result = stamps.timed(first, last)
    rows = {r["step"]: r for r in read_metrics(out) if r["step"] >= 1}
    timed_rows = [rows[s] for s in range(first, last + 1)]
    phases = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in timed_rows) for p in rl.PHASES}
    phases["other"] = statistics.median(w - r["time/step"] for w, r in zip(result["step_seconds"], timed_rows))
    return {**result, "phases": {k: round(v, 4) for k, v in phases.items()}, "total_seconds": round(total, 2),
            "reward_mean": statistics.mean(r["reward/mean"] for r in rows.values()),
            "response_length": statistics.mean(r["response_length"] for r in rows.values()),
            "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            "worker_peak_rss_mb": {k: round(v, 1) for k, v in rss.peak_mb.items()}}


def run_trl(args, scratch: str) -> dict:
    """TRL's GRPOTrainer on the same prompts and settings; step times from a callback."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from align.config import compose
    from align.models.loading import ensure_pad_token, load_tokenizer
    from align.trainers.rl import load_prompts
    from rewards import get_reward

    cfg, _ = compose(our_overrides(args, os.path.join(scratch, "cfg")))
    tok = load_tokenizer(args.model)
    prompts = load_prompts(cfg, tok).train  # our train split, in file order (TRL shuffles it itself)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ensure_pad_token(tok, model)
    reward = get_reward(WORKLOADS[args.workload][1])

    def reward_fn(prompts, completions, ground_truth=None, **kwargs):  # TRL's reward_funcs signature
        return reward(list(prompts), list(completions), ground_truth=list(ground_truth or [None] * len(prompts)))

    peft_config = None
    if args.finetune == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], bias="none", task_type="CAUSAL_LM")

    phase_log: dict[int, dict[str, float]] = {}

    class Timed(GRPOTrainer):
        """Adds up wall and CPU seconds per method into the current step's phase entry."""

        def _timed(self, name, method, *a, **k):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return method(*a, **k)
            finally:
                entry = phase_log.setdefault(self.state.global_step + 1, {})
                entry[name] = entry.get(name, 0.0) + time.perf_counter() - wall
                entry[f"{name}_cpu"] = entry.get(f"{name}_cpu", 0.0) + time.process_time() - cpu

        def _generate_single_turn(self, *a, **k):
            return self._timed("generate", super()._generate_single_turn, *a, **k)

        def _calculate_rewards(self, *a, **k):
            return self._timed("reward", super()._calculate_rewards, *a, **k)

        def _generate_and_score_completions(self, *a, **k):
            return self._timed("rollout", super()._generate_and_score_completions, *a, **k)

    class StepTimer(TrainerCallback):
        """Stamps the end of every optimizer step, and keeps the logged metrics."""

        def __init__(self):
            self.stamps, self.logs = StepStamps(), []

        def on_step_end(self, args, state, control, **k):
            self.stamps.take(state.global_step)

        def on_log(self, args, state, control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    rows = args.prompts_per_step * args.num_generations
    out = os.path.join(scratch, "run")
    config = GRPOConfig(
        output_dir=out, per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_iterations=1,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, beta=args.beta, epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
        loss_type="dapo", scale_rewards="group", learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        max_steps=args.warmup + args.steps, gradient_checkpointing=False, use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False, seed=args.seed,
    )
    timer = StepTimer()
    rows_ = [{"prompt": p["prompt"], "ground_truth": p.get("ground_truth")} for p in prompts]
    trainer = Timed(model=model, reward_funcs=[reward_fn], args=config, processing_class=tok,
                    train_dataset=Dataset.from_list(rows_),
                    peft_config=peft_config, callbacks=[timer])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    first = args.warmup + 1
    result = timer.stamps.timed(first, args.warmup + args.steps)
    phases = trl_phases(phase_log, first, result["step_seconds"])
    phases_cpu = trl_phases(phase_log, first, result["step_cpu_seconds"], suffix="_cpu")
    step_logs = [l for l in timer.logs if "reward" in l]
    return {**result, "phases": phases, "phases_cpu": phases_cpu, "total_seconds": round(total, 2),
            "reward_mean": statistics.mean(l["reward"] for l in step_logs) if step_logs else None,
            "response_length": statistics.mean(l["completions/mean_length"] for l in step_logs
                                               if "completions/mean_length" in l) if step_logs else None,
            "peak_rss_mb": round(peak_rss_mb(), 1), "trl": trl.__version__}


def trl_phases(phase_log: dict, first_step: int, step_totals: list[float], suffix: str = "") -> dict:
    """Median seconds per phase of TRL's timed steps (the first is `first_step`); `step_totals`
    are the steps' whole costs, so `update` is what the rollout timers leave over."""
    rows = []
    for step, whole in enumerate(step_totals, start=first_step):
        p = {k: phase_log.get(step, {}).get(k + suffix, 0.0) for k in ("generate", "reward", "rollout")}
        rows.append({"generate": p["generate"], "reward": p["reward"],
                     "prepare": p["rollout"] - p["generate"] - p["reward"], "update": whole - p["rollout"]})
    return {k: round(statistics.median(r[k] for r in rows), 4) for k in rows[0]}


def machine(threads: int, load_at_start: tuple[float, float, float]) -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    import peft
    import ray

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl_version,
            "ray": ray.__version__, "torch_threads": threads, "load_avg_at_start": list(load_at_start),
            "load_avg_at_end": list(os.getloadavg())}


def run_pair(args, order: tuple[str, ...]) -> dict:
    """Each framework in its own subprocess, one after the other; their figures and the ratio."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "RAY_DEDUP_LOGS": "0"}
    results = {}
    for worker in order:
        cmd = [sys.executable, os.path.abspath(__file__), *worker_argv(args), "--worker", worker]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        try:
            results[worker] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            tail = proc.stderr.strip().splitlines()[-5:] or [f"exit {proc.returncode}"]
            results[worker] = {"error": tail}
        r = results[worker]
        print(f"[bench_grpo] {worker}: {r.get('seconds_per_step', r.get('error'))} s/step, "
              f"{r.get('cpu_seconds_per_step')} CPU s/step", file=sys.stderr)
    ok = all("seconds_per_step" in results[w] for w in ("ours", "trl"))
    ratio = (lambda key: results["trl"][key] / results["ours"][key]) if ok else (lambda key: None)
    out = {"ours": results["ours"], "trl": results["trl"], "speedup": ratio("seconds_per_step"),
           "cpu_speedup": ratio("cpu_seconds_per_step"), "order": list(order)}
    if "ours_packed" in results and "phases" in results["ours_packed"] and "phases" in results["ours"]:
        packed, padded = results["ours_packed"], results["ours"]

        def trained(r):  # the phases packing changes: the no-grad reference pass and the update
            return r["phases"]["reference"] + r["phases"]["update"]

        out.update(ours_packed=packed, packing_speedup=padded["seconds_per_step"] / packed["seconds_per_step"],
                   packing_speedup_update=trained(padded) / trained(packed),
                   packing_speedup_vs_trl=results["trl"]["seconds_per_step"] / packed["seconds_per_step"] if ok else None)
    return out


def worker_argv(args) -> list[str]:
    return [f"--model={args.model}", f"--steps={args.steps}", f"--warmup={args.warmup}",
            f"--prompts-per-step={args.prompts_per_step}", f"--num-generations={args.num_generations}",
            f"--max-new-tokens={args.max_new_tokens}", f"--max-prompt-length={args.max_prompt_length}",
            f"--temperature={args.temperature}", f"--beta={args.beta}", f"--lr={args.lr}",
            f"--finetune={args.finetune}", f"--threads={args.threads}", f"--seed={args.seed}",
            f"--workload={args.workload}", f"--max-tokens-per-micro={args.max_tokens_per_micro}"] + (
                ["--mixed"] if args.mixed else [])


def main() -> None:
    from align.config import shared_data_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(shared_data_dir(), "models", "stories260K"))
    p.add_argument("--steps", type=int, default=8, help="timed steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing (at least 1)")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--num-generations", type=int, default=8, help="G, samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="story",
                   help="story: short story prompts + story reward; gsm8k: long math questions + math reward")
    p.add_argument("--max-prompt-length", type=int, default=None, help="default: 64 (story), 256 (gsm8k)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (> 0: a reference pass per step)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--finetune", choices=["lora", "full"], default="lora")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs; the order alternates between pairs")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 prompts x G=4, 16 new tokens, 1+2 steps")
    p.add_argument("--mixed", action="store_true",
                   help="mixed-length workload: GSM8K prompts (<= 192 tokens) with long-tailed answers (--max-new-tokens "
                        "320: stories260K's 512-token context); ours also with packing + token budgets (ours_packed, "
                        "packing_speedup)")
    p.add_argument("--max-tokens-per-micro", type=int, default=32768, help="ours_packed's trainer.max_tokens_per_micro")
    p.add_argument("--worker", choices=["ours", "ours_packed", "trl"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mixed:
        args.workload = "gsm8k"
        if "--max-new-tokens" not in " ".join(sys.argv):
            args.max_new_tokens = 320
        if args.max_prompt_length is None:
            args.max_prompt_length = 192  # + 320 new tokens = stories260K's context
    if args.quick:
        args.steps, args.warmup, args.prompts_per_step, args.num_generations, args.max_new_tokens = 2, 1, 2, 4, 16
    if args.max_prompt_length is None:
        args.max_prompt_length = WORKLOADS[args.workload][2]
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step's time includes start-up)")

    if args.worker:  # inside a subprocess: one framework, its figures as the last line
        import torch

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory(prefix=f"bench_grpo_{args.worker}_") as scratch:  # run folders go with it
            print(json.dumps((run_trl if args.worker == "trl" else run_ours)(args, scratch)))
        return

    load_at_start = os.getloadavg()
    sides = ("ours", "trl") + (("ours_packed",) if args.mixed else ())
    runs = [run_pair(args, sides if i % 2 == 0 else sides[::-1]) for i in range(args.repeats)]
    speedups = [r["speedup"] for r in runs if r["speedup"] is not None]
    cpu_speedups = [r["cpu_speedup"] for r in runs if r["cpu_speedup"] is not None]
    report = {
        "ours": runs[0]["ours"] if len(runs) == 1 else _median_side(runs, "ours"),
        "trl": runs[0]["trl"] if len(runs) == 1 else _median_side(runs, "trl"),
        "speedup": statistics.median(speedups) if speedups else None,
        "cpu_speedup": statistics.median(cpu_speedups) if cpu_speedups else None,
    }
    if args.mixed:
        report.update({k: runs[0].get(k) for k in ("ours_packed", "packing_speedup", "packing_speedup_update",
                                                  "packing_speedup_vs_trl")} if len(runs) == 1 else
                      {k: statistics.median(r[k] for r in runs if r.get(k) is not None)
                       for k in ("packing_speedup", "packing_speedup_update")})
        report["max_tokens_per_micro"] = args.max_tokens_per_micro
    if len(runs) > 1:
        report.update(speedups=speedups, cpu_speedups=cpu_speedups, runs=runs)
    report["settings"] = {
        "model": args.model, "dtype": "float32", "device": "cpu", "finetune": args.finetune,
        "lora": LORA if args.finetune == "lora" else None, "workload": args.workload,
        "prompts": WORKLOADS[args.workload][3],
        "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
        "rows_per_step": args.prompts_per_step * args.num_generations, "max_new_tokens": args.max_new_tokens,
        "max_prompt_length": args.max_prompt_length, "temperature": args.temperature, "top_p": 1.0, "top_k": None,
        "reward": WORKLOADS[args.workload][1], "advantages": "group mean/std", "clip": [CLIP_LOW, CLIP_HIGH], "loss_agg": "token-mean",
        "beta": args.beta, "kl": "k3", "reference": "adapters off" if args.finetune == "lora" else "frozen copy",
        "updates_per_step": 1, "micro_batches_per_step": 1, "lr": args.lr, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "threads": args.threads, "repeats": args.repeats, "seed": args.seed,
        "quick": args.quick,
    }
    report["machine"] = machine(args.threads, load_at_start)
    print(json.dumps(report, indent=1))


def _median_side(runs: list[dict], side: str) -> dict:
    ok = [r[side] for r in runs if "seconds_per_step" in r[side]]
    if not ok:
        return {"error": "every run failed"}
    return {"seconds_per_step": statistics.median(r["seconds_per_step"] for r in ok),
            "cpu_seconds_per_step": statistics.median(r["cpu_seconds_per_step"] for r in ok),
            "steps": sum(r["steps"] for r in ok),
            "phases": {k: statistics.median(r["phases"][k] for r in ok) for k in ok[0]["phases"]}}


if __name__ == "__main__":
    main()
