"""Peak memory and time of one log-prob + backward pass through an LM head: the full
(B, T, V) logits against the chunked path (`align.core.linear_logprobs`).

Qwen2-0.5B's head by default: hidden 896, vocabulary 151,936, 8 rows x 1,024 tokens, fp32, random
weights. Each variant runs in a fresh process (peak RSS is a process high-water mark), which
builds the hidden states and the head, takes a baseline RSS, then computes log-probs (and
entropies) with gradients for both, backward included. Prints one JSON object; `memory_ratio` is
chunked / full of the peak above the baseline.

    python scripts/bench_logprobs.py [--rows 8 --tokens 1024 --vocab 151936 --hidden 896]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> dict:
    sys.path.insert(0, str(REPO))
    import torch

    from align.core.linear_logprobs import linear_logprobs
    from align.core.logprobs import entropy_from_logits, logprobs_from_logits

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    hidden = torch.randn(args.rows, args.tokens, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, args.vocab, (args.rows, args.tokens))
    baseline = _rss_mb()
    t0 = time.perf_counter()
    if args.variant == "full":
        logits = hidden @ weight.T  # (B, T, V): kept for the backward
        logp, ent = logprobs_from_logits(logits, labels), entropy_from_logits(logits)
    else:
        logp, ent = linear_logprobs(hidden, weight, labels, entropy=True)
    (logp.sum() + 0.01 * ent.sum()).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB -> MB on Linux
    return {"variant": args.variant, "seconds": round(seconds, 2), "baseline_mb": round(baseline, 1),
            "peak_mb": round(peak, 1), "peak_above_baseline_mb": round(peak - baseline, 1),
            "logp_sum": float(logp.sum()), "grad_hidden_norm": float(hidden.grad.norm())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    p.add_argument("--variant", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    results = {}
    for variant in ("chunked", "full"):
        cmd = [sys.executable, __file__, "--variant", variant, "--rows", str(args.rows), "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    summary = {
        "bench": "logprobs", "rows": args.rows, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden,
        "full": full, "chunked": chunked,
        "memory_ratio": round(chunked["peak_above_baseline_mb"] / full["peak_above_baseline_mb"], 4),
        "speed_ratio": round(full["seconds"] / chunked["seconds"], 3),  # > 1: chunked is faster
        "same_result": abs(full["logp_sum"] - chunked["logp_sum"]) <= 1e-3 * abs(full["logp_sum"]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "python": platform.python_version()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
