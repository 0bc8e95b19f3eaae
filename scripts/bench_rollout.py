"""Rollout throughput: generated tokens per second by batch size, for each available backend.

    python scripts/bench_rollout.py                                  # stories260K, HF (and vLLM if importable)
    python scripts/bench_rollout.py --model tiny-llama               # a random Llama vLLM-on-CPU can run
    python scripts/bench_rollout.py --batch-sizes 1,4,16,64 --max-new-tokens 64 --repeats 3 --threads 1

On a small shared CPU pass `--threads 1`: a tiny model gains nothing from more threads, and
oversubscribed threads spin (here 2 threads under load ran ~4x slower than 1).

Prints one JSON object: the machine, the workload, tokens/s per backend and batch size, the
vLLM/HF ratio at each batch size where both ran, and `fast_decode_speedup`: the HF engine with
its lean decode step (`hf`, the default) over the same engine running the model's forward for
every token (`hf-forward`, `rollout.fast_decode=false`). The workload is `batch` story openings, sampled
at temperature 1 (seeded) for up to `max_new_tokens` each; tokens counted are those actually
generated (a row that stops early counts only its tokens, while its slot still costs compute,
as in a real rollout). Each point is the median over `repeats` timed calls after one warm-up.

vLLM is optional: `rollout.vllm_engine.VLLMEngine` is imported guarded, and a backend that cannot
start or fails (no vllm installed, or vLLM-on-CPU refusing stories260K's head_dim of 8) is
reported with its error instead of figures. `--model tiny-llama` writes a random Llama with
head_dim 32 (vocabulary and tokenizer of stories260K) to a temporary folder, so both backends
can run on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

OPENINGS = [
    "Once upon a time",
    "The little dog ran to the park",
    "Lily and Tom found a big box",
    "One day, a bird",
    "The sun was hot and the children",
    "Sam had a red ball. He",
    "There was a small cat who liked to",
    "Mom said, \"Let's go",
]


def machine(device: str) -> dict:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        import vllm

        info["vllm"] = vllm.__version__
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        info["vllm"] = None
    return info


def time_backend(engine, prompts, batch_sizes, max_new_tokens, repeats, seed) -> dict:
    """{batch: {tokens_per_s, tokens, seconds}} for one engine; the first call of each size warms up."""
    from rollout import SamplingParams

    results = {}
    for batch in batch_sizes:
        batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
        params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed)
        engine.generate(batch_prompts, params)  # warm-up (allocations, kernels, graph capture)
        rates, tokens, seconds = [], [], []
        for r in range(repeats):
            params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + 1 + r)
            start = time.perf_counter()
            out = engine.generate(batch_prompts, params)
            elapsed = time.perf_counter() - start
            n = sum(len(s.token_ids) for s in out.samples)
            rates.append(n / elapsed)
            tokens.append(n)
            seconds.append(round(elapsed, 4))
        results[str(batch)] = {"tokens_per_s": round(statistics.median(rates), 1), "tokens": tokens, "seconds": seconds}
    return results


def hf_engine(model_path: str, device: str, dtype: str, max_batch_size: int, fast_decode: bool = True):
    from align.models import load_model_and_tokenizer
    from rollout import HFEngine

    model, tok = load_model_and_tokenizer(model_path, dtype=dtype, device=device)
    return HFEngine(model.eval(), tok, max_batch_size=max_batch_size, fast_decode=fast_decode), tok


def vllm_engine(model_path: str, dtype: str):
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout carries only the JSON
    from rollout.vllm_engine import VLLMEngine

    return VLLMEngine(model_path, dtype=dtype, max_model_len=512, seed=0)


def write_tiny_llama(folder: str, stories_path: str) -> str:
    """A random Llama (2 layers, hidden 128, 4 heads: head_dim 32) with stories260K's tokenizer."""
    from align.models import build_tiny_llama, load_tokenizer

    build_tiny_llama(seed=0, hidden_size=128, num_layers=2, num_heads=4).save_pretrained(folder)
    load_tokenizer(stories_path).save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    from align.models import DEFAULT_MODEL, resolve_device

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder, or 'tiny-llama' (default: stories260K)")
    parser.add_argument("--batch-sizes", default="1,4,16,64")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="hf,hf-forward,vllm",
                        help="hf (lean decode step), hf-forward (the model's forward each step), vllm")
    parser.add_argument("--device", default="auto", help="HF backend device: auto, cpu, cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    with tempfile.TemporaryDirectory() as tmp:
        model_path = write_tiny_llama(tmp, DEFAULT_MODEL) if args.model == "tiny-llama" else args.model
        report = {
            "benchmark": "rollout generated tokens per second",
            "machine": machine(device),
            "model": os.path.abspath(model_path) if args.model != "tiny-llama" else "tiny-llama (random, head_dim 32)",
            "workload": {
                "batch_sizes": batch_sizes,
                "max_new_tokens": args.max_new_tokens,
                "temperature": 1.0,
                "repeats": args.repeats,
                "dtype": args.dtype,
                "statistic": "median tokens/s over repeats, after one warm-up call",
            },
            "backends": {},
        }
        tok = None
        for name, fast in (("hf", True), ("hf-forward", False)):
            if name in backends:
                engine, tok = hf_engine(model_path, device, args.dtype, max_batch_size=max(batch_sizes), fast_decode=fast)
                report["backends"][name] = time_backend(
                    engine, _prompts(tok), batch_sizes, args.max_new_tokens, args.repeats, args.seed
                )
                del engine
        if "vllm" in backends:
            report["backends"]["vllm"] = _run_vllm(model_path, args, batch_sizes, tok)

    hf, vl = report["backends"].get("hf", {}), report["backends"].get("vllm", {})
    slow = report["backends"].get("hf-forward", {})
    if hf and slow:
        report["fast_decode_speedup"] = {
            b: round(hf[b]["tokens_per_s"] / slow[b]["tokens_per_s"], 3) for b in hf if b in slow and slow[b]["tokens_per_s"]
        }
    if "error" not in vl and hf and vl:
        report["vllm_over_hf"] = {
            b: round(vl[b]["tokens_per_s"] / hf[b]["tokens_per_s"], 3) for b in hf if b in vl and hf[b]["tokens_per_s"]
        }
    text = json.dumps(report, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return report


def _prompts(tok) -> list[list[int]]:
    return [tok(t).input_ids for t in OPENINGS]


def _run_vllm(model_path, args, batch_sizes, tok) -> dict:
    """vLLM figures, or {"error": why} when it is not installed or cannot run this model."""
    try:
        engine = vllm_engine(model_path, args.dtype)
    except Exception as err:  # noqa: BLE001 - ImportError, or an engine that cannot start here
        return {"error": f"{type(err).__name__}: {err}"[:500]}
    try:
        if tok is None:
            from align.models import load_tokenizer

            tok = load_tokenizer(model_path)
        return time_backend(engine, _prompts(tok), batch_sizes, args.max_new_tokens, args.repeats, args.seed)
    except Exception as err:  # noqa: BLE001 - e.g. vLLM-on-CPU's head_dim limits, at the first generate
        return {"error": f"{type(err).__name__}: {err}"[:500]}
    finally:
        close = getattr(engine, "close", None)
        if close is not None:
            close()


if __name__ == "__main__":  # vLLM spawns workers: keep the guard
    main()
