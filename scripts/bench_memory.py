"""Peak memory of one PPO-shaped step: the shared multi-head model against one model per role.

Workload, identical for every layout: reference, critic and reward forward passes (inference
only), the actor's log-probs, then one actor update and one critic update (backward and AdamW
step each). Layouts:

- shared:        MultiHeadModel, one base, a LoRA adapter per role (rank --rank, all linear layers);
- separate:      four copies of the base (actor, critic, reward, frozen reference), each trainable
                 copy with the same LoRA adapter: OpenRLHF's LoRA layout;
- separate_full: four copies with full fine-tuning of actor and critic (--full-ft; large).

Activations grow with tokens x hidden x layers and weights with hidden^2 x layers, so the
ratio approaches 1/4 as the model grows and rises with the tokens per micro-batch: the default
model is big enough that its weights outweigh one 256-token micro-batch's activations.

Each layout runs in a fresh subprocess. On CPU the peak is the process's peak resident set
(VmHWM) minus its resident set after the imports, i.e. what the models and the step cost; raw
peaks are printed too. On CUDA it is torch.cuda.max_memory_allocated. Prints one JSON object.

    python scripts/bench_memory.py              # a ~268M-parameter random Llama
    python scripts/bench_memory.py --hidden 768 --layers 12 --intermediate 3072 --full-ft   # ~138M
    python scripts/bench_memory.py --small      # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

LAYOUTS = ("shared", "separate")


def _rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(layout: str, args) -> dict:
    import peft  # noqa: F401  (imports done before the baseline is read)
    import torch
    import transformers  # noqa: F401

    from align.models import MultiHeadModel, RoleConfig, SeparateModels, build_tiny_llama

    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    baseline = 0 if cuda else _rss_bytes("VmRSS")
    start = time.perf_counter()

    base = build_tiny_llama(
        seed=0, vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=args.hidden // 64 or 1, intermediate_size=args.intermediate, tie_word_embeddings=True,
    ).to(args.device)
    params = sum(p.numel() for p in base.parameters())
    lora = RoleConfig(r=args.rank)
    if layout == "shared":
        model = MultiHeadModel(base, {r: lora for r in ("actor", "critic", "reward")}, pad_token_id=0)
    elif layout == "separate":
        model = SeparateModels.from_base(base, lora=lora, pad_token_id=0)
    elif layout == "separate_full":
        model = SeparateModels.from_base(base, pad_token_id=0)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    del base  # the shared model and SeparateModels (as the reference) hold it

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    real = mask[:, 1:].bool()
    actor_opt = torch.optim.AdamW(model.trainable_parameters("actor"), lr=1e-5)
    critic_opt = torch.optim.AdamW(model.trainable_parameters("critic"), lr=1e-5)

    # 1. inference-only passes: reference log-probs, critic values, reward scores, old actor log-probs
    with torch.no_grad():
        model.multi_role_forward(ids, mask, roles=("reference", "critic", "reward"))
        model.log_probs(ids, mask, role="actor")
    # 2. one actor update
    loss = -model.log_probs(ids, mask, role="actor")[real].mean()
    loss.backward()
    actor_opt.step()
    actor_opt.zero_grad(set_to_none=True)
    # 3. one critic update
    loss = model.values(ids, mask).pow(2).mean()
    loss.backward()
    critic_opt.step()
    critic_opt.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.synchronize()
        raw_peak = peak = torch.cuda.max_memory_allocated()
    else:
        raw_peak = _rss_bytes("VmHWM")
        peak = raw_peak - baseline
    return {
        "layout": layout,
        "peak_bytes": peak,
        "raw_peak_bytes": raw_peak,
        "baseline_bytes": baseline,
        "params": params,
        "trainable_params": {r: sum(p.numel() for p in model.trainable_parameters(r)) for r in ("actor", "critic")},
        "multi_role_mode": model.multi_role_modes[0],
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model: a smoke run of the whole script")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--full-ft", action="store_true", help="also measure four copies with full fine-tuning")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (memory does not depend on it)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--worker", choices=(*LAYOUTS, "separate_full"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.small:
        args.hidden, args.layers, args.intermediate, args.vocab, args.seq = 64, 2, 256, 512, 32
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return

    layouts = (*LAYOUTS, "separate_full") if args.full_ft else LAYOUTS
    passthrough = [a for a in sys.argv[1:] if a != "--full-ft"] + ["--device", args.device]
    results = {}
    for layout in layouts:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", layout, *passthrough],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"layout {layout} failed (exit {proc.returncode})")
        results[layout] = json.loads(proc.stdout.strip().splitlines()[-1])

    import torch

    shared, separate = results["shared"], results["separate"]
    out = {
        "shared_peak_bytes": shared["peak_bytes"],
        "separate_peak_bytes": separate["peak_bytes"],
        "ratio": round(shared["peak_bytes"] / separate["peak_bytes"], 4),
        "ratio_raw_peaks": round(shared["raw_peak_bytes"] / separate["raw_peak_bytes"], 4),
        "params": shared["params"],
        "weights_bytes_fp32": shared["params"] * 4,
        "layouts": results,
        "peak_definition": "CUDA: max_memory_allocated; CPU: peak RSS (VmHWM) minus RSS after imports",
        "workload": {"batch": args.batch, "seq": args.seq, "steps": "reference+critic+reward+actor forwards, "
                     "one actor and one critic AdamW update"},
        "model_config": {"arch": "llama (random init)", "hidden": args.hidden, "layers": args.layers,
                         "intermediate": args.intermediate, "vocab": args.vocab, "tied_embeddings": True,
                         "dtype": "float32", "lora_rank": args.rank, "lora_targets": "all-linear"},
        "machine": {"device": args.device, "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "python": platform.python_version()},
    }
    if "separate_full" in results:
        out["separate_full_ft_peak_bytes"] = results["separate_full"]["peak_bytes"]
        out["ratio_vs_full_ft"] = round(shared["peak_bytes"] / results["separate_full"]["peak_bytes"], 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
