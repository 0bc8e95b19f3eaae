"""Scaling knobs measured on one model: activation checkpointing on vs off (and, to be added by
the FSDP2 work, 2-rank `fsdp2` vs 1 rank), full fine-tuning on CPU.

The model is Qwen2-0.5B's architecture (its published config.json, below: 24 layers, hidden
896, 14 heads / 2 KV heads, MLP 4,864, vocabulary 151,936, tied embeddings; 494M parameters)
with random weights, built offline; the input is random token ids (no tokenizer needed). A step
is SFT's: `align.trainers.sft.token_nll` (the decoder, then the LM head in chunks) with its
gradient, through `TrainEngine` (fp32) and AdamW, exactly what `python -m align algo=sft` runs.

Each configuration runs in a fresh process (peak RSS is a process high-water mark):
1. imports, then `baseline` = VmRSS;
2. the model built (with `trainer.gradient_checkpointing` applied by `TrainEngine.prepare`), and
   AdamW's state allocated up front (one step at lr 0 on zero gradients), so that `held` = VmRSS
   is weights + optimizer state, what the process keeps between steps;
3. VmHWM reset (`/proc/self/clear_refs` 5), then `--steps` training steps on one micro-batch of
   `--batch` x `--tokens` tokens, each timed;
4. `peak` = VmHWM - baseline (the process's peak for the model, its optimizer and the step), and
   `step_peak` = VmHWM - held (what the step adds: gradients, activations, transients).
tokens/s is the batch's tokens over the fastest step's time (the first step also pays for faulting in
fresh memory).

JSON fields: `checkpointing_peak_ratio` = peak on / peak off (the whole process above its
imports); `checkpointing_step_peak_ratio` = step_peak on / step_peak off (what a step adds over
the held weights and optimizer state); `checkpointing_tokens_per_s` {off, on}; per configuration
all raw figures; and `machine`.

    python scripts/bench_scale.py                      # checkpointing section, Qwen2-0.5B shape
    python scripts/bench_scale.py --layers 2 --tokens 128 --steps 1   # seconds: a smoke run

Sections: SECTIONS maps a name to a function (args) -> dict of fields merged into the one
JSON object; `--only` picks some. A section measures through `run_child(kind, args, extra)`,
which reruns this file as `--child kind` in a fresh process and reads the JSON line it prints;
CHILDREN maps a kind to the function that runs in that process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Qwen2-0.5B's config.json (huggingface.co/Qwen/Qwen2-0.5B), the keys that shape the model.
QWEN2_0_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
    use_sliding_window=False, sliding_window=131072, max_window_layers=24,
)


# ---- measuring inside a child process ---------------------------------------------------------
def _status(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since start or the last reset) of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: `echo 5 > /proc/PID/clear_refs`)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(args):
    """The configured Qwen2 shape with random weights (seed 0), fp32, in training mode."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = dict(QWEN2_0_5B)
    if args.layers:
        config.update(num_hidden_layers=args.layers, max_window_layers=args.layers)
    config.pop("model_type")
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**config)).train()


def _sft_batch(args, vocab: int):
    import torch

    from align.trainers.sft import SFTBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.tokens), generator=g)
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # a prompt: the loss on the last three quarters
    return SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def child_train(args) -> dict:
    """One configuration of full fine-tuning (see the module docstring for the protocol)."""
    import peft  # noqa: F401  (everything imported before the baseline)
    import torch
    import transformers  # noqa: F401

    from align.engine import TrainEngine
    from align.trainers.sft import token_nll

    torch.set_num_threads(args.threads)
    baseline = _status("VmRSS")
    model = build_model(args)
    params = sum(p.numel() for p in model.parameters())
    engine = TrainEngine("fp32", "cpu", activation_checkpointing=args.checkpointing)
    engine.prepare(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for group in optimizer.param_groups:  # allocate AdamW's moments now: held = weights + optimizer state
        group["lr"] = 0.0
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        group["lr"] = 1e-5
    batch = _sft_batch(args, model.config.vocab_size)
    held = _status("VmRSS")
    _reset_peak()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        nll, mask = token_nll(model, batch)
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        engine.step(trainable, optimizer, 1.0)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = _status("VmHWM")
    tokens = args.batch * args.tokens
    return {
        "checkpointing": args.checkpointing, "params": params, "layers": model.config.num_hidden_layers,
        "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
        "baseline_bytes": baseline, "held_bytes": held - baseline, "peak_bytes": peak - baseline,
        "step_peak_bytes": peak - held, "step_seconds": [round(t, 2) for t in times],
        "tokens_per_s": round(tokens / min(times), 2), "losses": losses,
    }


CHILDREN = {"train": child_train}


def run_child(kind: str, args, extra: list[str]) -> dict:
    """Run CHILDREN[kind] in a fresh process of this script (same arguments, plus `extra`)."""
    cmd = [sys.executable, os.path.abspath(__file__), *args.argv, "--child", kind, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"{kind} {extra}: exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- sections ----------------------------------------------------------------------------------
def section_checkpointing(args) -> dict:
    """Activation checkpointing off vs on, one process each."""
    off = run_child("train", args, [])
    on = run_child("train", args, ["--checkpointing"])
    return {
        "checkpointing_peak_ratio": round(on["peak_bytes"] / off["peak_bytes"], 4),
        "checkpointing_step_peak_ratio": round(on["step_peak_bytes"] / off["step_peak_bytes"], 4),
        "checkpointing_tokens_per_s": {"off": off["tokens_per_s"], "on": on["tokens_per_s"]},
        "checkpointing_same_losses": all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(off["losses"], on["losses"])),
        "checkpointing": {"off": off, "on": on},
    }


SECTIONS = {"checkpointing": section_checkpointing}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--layers", type=int, default=0, help="override the number of decoder layers (0: the config's)")
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per configuration")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    args.argv = [a for a in argv if a != "--checkpointing"]
    result = {"bench": "scale", "model": "Qwen2-0.5B shape, random weights", "finetune": "full",
              "optimizer": "adamw", "precision": "fp32"}
    for name in args.only.split(","):
        if name not in SECTIONS:
            p.error(f"--only: unknown section {name!r}; sections: {list(SECTIONS)}")
        result.update(SECTIONS[name](args))
    import torch

    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "threads": args.threads, "python": platform.python_version(), "torch": torch.__version__}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
