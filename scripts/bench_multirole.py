"""Time the inference-only roles (reference log-probs, critic values, reward scores) on one batch
in each multi-role mode: one forward per role ("separate") against one forward over the batch
repeated per role with peft's mixed-adapter batches ("mixed").

MultiHeadModel.multi_role_forward defaults to whichever mode this measures faster. Prints one
JSON object. Both modes are timed interleaved, so load from other processes hits them alike.

    python scripts/bench_multirole.py            # a ~50M-parameter random Llama, batch 8 x 128
    python scripts/bench_multirole.py --small    # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from align.models import MultiHeadModel, RoleConfig, build_tiny_llama


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny model and batch: a smoke run")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on busy shared cores)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.small:
        args.hidden, args.layers, args.vocab, args.batch, args.seq = 64, 2, 512, 4, 32

    base = build_tiny_llama(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
        num_heads=max(1, args.hidden // 64), tie_word_embeddings=True,
    ).to(args.device)
    params = sum(p.numel() for p in base.parameters())
    roles = {r: RoleConfig(r=args.rank) for r in ("actor", "critic", "reward")}
    model = MultiHeadModel(base, roles, pad_token_id=0).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero adapters, so every LoRA path does real work
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=gen).to(args.device)
    mask = torch.ones_like(ids)
    served = ("reference", "critic", "reward")

    def run(mode: str) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model.multi_role_forward(ids, mask, roles=served, mode=mode)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    modes = MultiHeadModel.multi_role_modes
    outs = {mode: model.multi_role_forward(ids, mask, roles=served, mode=mode) for mode in modes}  # warm-up
    max_diff = max((outs[m][r] - outs["separate"][r]).abs().max().item() for m in modes for r in served)
    times = {mode: [] for mode in modes}
    for _ in range(args.repeats):
        for mode in modes:
            times[mode].append(run(mode))
    median = {m: statistics.median(t) for m, t in times.items()}
    print(json.dumps({
        "roles": list(served),
        "seconds_median": {m: round(t, 4) for m, t in median.items()},
        "seconds_min": {m: round(min(t), 4) for m, t in times.items()},
        "speedup_over_separate": {m: round(median["separate"] / median[m], 3) for m in modes},
        "fastest": min(median, key=median.get),
        "max_abs_diff_vs_separate": max_diff,
        "default_mode": MultiHeadModel.multi_role_modes[0],
        "params": params,
        "model_config": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "lora_rank": args.rank,
                         "target_modules": "all-linear", "dtype": "float32"},
        "batch": [args.batch, args.seq],
        "repeats": args.repeats,
        "machine": {"device": args.device, "cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__},
    }))


if __name__ == "__main__":
    main()
