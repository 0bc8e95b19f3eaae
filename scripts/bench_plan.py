"""The memory planner against measured peaks: real short runs, predicted vs measured peak RSS.

Each configuration is a real `python -m align <overrides> trainer.max_steps=2` run in a fresh
process. The planner (align/plan.py) predicts each process's peak from the model's config alone;
the run's peaks are measured: the in-process trainer's from `os.wait4` (ru_maxrss), the Ray
workers' and driver's from /proc/<pid>/status VmHWM, polled while they live (VmHWM only grows, so
the last read is the peak up to that moment). Every process must be within +-25% of its
prediction. On CPU a peak includes the Python runtime (torch, transformers, peft imported: a
measured constant, `align.plan.CPU_RUNTIME_BYTES`; `--baseline` re-measures it), so the model a
configuration trains is a random Llama of ~25M parameters (`--hidden/--layers`), big enough that
its weights, optimizer state and activations are a large share of the peak.

    python scripts/bench_plan.py                 # all configurations, one JSON object
    python scripts/bench_plan.py --only sft_full,grpo_lora_2ranks
    python scripts/bench_plan.py --baseline      # the runtime constants

Prints one JSON object: per configuration the predicted and measured peak of every process and
their relative error, and `max_rel_error`, the worst case. Exit status 1 when it exceeds 0.25.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TOLERANCE = 0.25
STEPS = ["trainer.max_steps=2", "trainer.progress=false", "trainer.eval_every=1000", "trainer.save_every=1000",
         "trainer.num_threads=1", "trainer.check_memory=off"]
# Small prompt sets keep a run to seconds: DPO precomputes reference log-probs of every pair.
DPO = ["algo=dpo", "data.limit=240", "algo.reference_cache=false", "trainer.eval_batches=1", "trainer.batch_size=8"]
GRPO = ["algo=grpo", "algo.rollout_batch_size=4", "algo.num_generations=4", "algo.eval_prompts=0",
        "trainer.batch_size=8", "cluster.num_cpus=2"]
# name -> overrides (the model folder is appended). Together: LoRA and full, 1 and 2 ranks,
# checkpointing on and off (when this build has trainer.gradient_checkpointing), SFT, DPO, RM, GRPO.
CONFIGS = {
    "sft_full": ["algo=sft", "data.limit=200", "trainer.eval_batches=1"],
    "sft_lora": ["algo=sft", "model.finetune=lora", "data.limit=200", "trainer.eval_batches=1"],
    "sft_full_checkpointing": ["algo=sft", "data.limit=200", "trainer.eval_batches=1",
                               "trainer.gradient_checkpointing=true"],
    "dpo_full": DPO,
    "dpo_lora": DPO + ["model.finetune=lora"],
    "rm_full": ["algo=rm", "data.limit=240", "trainer.eval_batches=1"],
    "grpo_lora_1rank": GRPO,
    "grpo_lora_2ranks": GRPO + ["cluster.num_replicas=2", "trainer.strategy=ddp"],
    "grpo_full_1rank": GRPO + ["model.finetune=full"],
}


def make_model(folder: Path, hidden: int, layers: int) -> str:
    """A random Llama with stories260K's tokenizer (its 512-token vocabulary), saved as HF weights."""
    from align.config import shared_data_dir
    from align.models import build_tiny_llama

    if not (folder / "config.json").exists():
        model = build_tiny_llama(seed=0, vocab_size=512, hidden_size=hidden, num_layers=layers,
                                 num_heads=hidden // 64, num_kv_heads=hidden // 128 or 1,
                                 intermediate_size=hidden * 8 // 3, tie_word_embeddings=True,
                                 max_position_embeddings=512)
        model.save_pretrained(folder)
    stories = os.path.join(shared_data_dir(), "models", "stories260K")
    return [f"model.name_or_path={folder}", f"model.tokenizer={stories}"]


def _hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_measured(overrides: list[str], out: Path) -> dict:
    """Run `python -m align` and return {process kind: [peak bytes, ...]}."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "align", *overrides, *STEPS, f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: dict[int, int] = {}
    log = []
    import threading

    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        info = out / "workers.json"
        if info.exists():
            try:
                for w in json.loads(info.read_text()):
                    workers.setdefault(w["pid"], 0)
            except (ValueError, KeyError):
                pass
        for wpid, seen in workers.items():
            workers[wpid] = max(seen, _hwm(wpid) or 0)
        time.sleep(0.05)
    reader.join(timeout=5)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(log)[-3000:]}")
    driver = usage.ru_maxrss * 1024
    return {"trainer" if not workers else "driver": [driver], **({"worker": list(workers.values())} if workers else {})}


def predict(overrides: list[str]) -> dict:
    """{process kind: predicted peak bytes} from the planner."""
    from align.config import compose
    from align.plan import plan_run

    cfg, _ = compose([*overrides, *STEPS, "output_dir=/tmp/unused"])
    plan = plan_run(cfg, device="cpu")
    out = {}
    for p in plan.processes:
        kind = "driver" if p.name.startswith("driver") else "worker" if p.name.startswith("worker") else "trainer"
        out[kind] = p.peak
    return out, plan


def bench(names: list[str], model_overrides: list[str], workdir: Path) -> dict:
    from align.config import ConfigError

    results, worst = {}, 0.0
    for name in names:
        overrides = CONFIGS[name] + model_overrides
        try:
            predicted, plan = predict(overrides)
        except ConfigError as exc:
            results[name] = {"skipped": f"not in this build: {exc}"}
            continue
        except Exception as exc:  # hydra: an unknown key (e.g. trainer.gradient_checkpointing)
            if "gradient_checkpointing" in str(exc):
                results[name] = {"skipped": "trainer.gradient_checkpointing is not in this build's config"}
                continue
            raise
        t0 = time.perf_counter()
        measured = run_measured(overrides, workdir / name)
        rows = []
        for kind, peaks in measured.items():
            for peak in peaks:
                err = (predicted[kind] - peak) / peak
                worst = max(worst, abs(err))
                rows.append({"process": kind, "predicted_mib": round(predicted[kind] / 2**20, 1),
                             "measured_mib": round(peak / 2**20, 1), "rel_error": round(err, 3)})
        main = next(p for p in plan.processes if not p.name.startswith("driver"))
        results[name] = {"overrides": overrides[:-2], "processes": rows, "seconds": round(time.perf_counter() - t0, 1),
                         "predicted_parts_mib": {k: round(v / 2**20, 1) for k, v in main.parts.items() if v}}
        print(f"{name}: {rows}", file=sys.stderr, flush=True)
    return {"configs": results, "max_rel_error": round(worst, 3), "tolerance": TOLERANCE,
            "measured": sum("processes" in r for r in results.values())}


RAY_ACTOR = """
import json, ray
ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR")

@ray.remote
class Probe:
    def rss(self):
        import torch, transformers, peft, align.workers.worker, rollout.hf  # what a ModelWorker imports
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

print(ray.get(Probe.remote().rss.remote()))
"""


def baseline(workdir: Path) -> dict:
    """The runtime constants of `align.plan.CPU_RUNTIME_BYTES`, measured.

    trainer: a real two-step SFT run of stories260K (whose tensors the planner puts at a few tens
    of MiB) minus those predicted tensors: the imports plus tokenizer, data, logging and thread
    pools. ray_worker: a Ray actor's peak after importing what a ModelWorker imports. driver: the
    peak of a GRPO run's driver process (it holds no model)."""
    from align.config import shared_data_dir

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    code = "import resource, torch, transformers, peft, hydra, align.trainers.sft; " \
           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"
    imports = int(subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                                 env=env).stdout.split()[-1])
    stories = [f"model.name_or_path={os.path.join(shared_data_dir(), 'models', 'stories260K')}"]
    sft = ["algo=sft", "data.limit=200", "trainer.eval_batches=1"] + stories
    predicted, plan = predict(sft)
    tensors = predicted["trainer"] - plan.processes[0].parts["runtime"]
    trainer = run_measured(sft, workdir / "baseline_sft")["trainer"][0] - tensors
    grpo = run_measured(GRPO + stories + ["model.finetune=lora"], workdir / "baseline_grpo")["driver"][0]
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)  # as `python -m align` sets it for its workers
    actor = int(subprocess.run([sys.executable, "-c", RAY_ACTOR], check=False, capture_output=True, text=True, cwd=REPO,
                               env=env).stdout.split()[-1])
    def mib(n: int) -> float:
        return round(n / 2**20, 1)

    return {"imports_only_mib": mib(imports), "trainer_mib": mib(trainer), "ray_worker_mib": mib(actor),
            "driver_mib": mib(grpo)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--baseline", action="store_true")
    args = ap.parse_args()
    if args.baseline:
        with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
            print(json.dumps(baseline(Path(tmp))))
        return
    names = args.only.split(",") if args.only else list(CONFIGS)
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        model = make_model(Path(tmp) / "model", args.hidden, args.layers)
        result = bench(names, model, Path(tmp))
    result["model"] = {"hidden": args.hidden, "layers": args.layers}
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["max_rel_error"] <= TOLERANCE else 1)


if __name__ == "__main__":
    main()
