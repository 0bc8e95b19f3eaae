"""Scaling knobs measured on one model: activation checkpointing on vs off, and 2-rank `fsdp2`
vs 1 rank, full fine-tuning on CPU, both sections in one run printing one JSON object.

The model is a published architecture's shape (its config.json, MODELS below) with random
weights, built offline; the input is random token ids (no tokenizer needed). A step is SFT's:
`align.trainers.sft.token_nll` (the decoder, then the LM head in chunks) with its gradient,
through `TrainEngine` (fp32) and AdamW, exactly what `python -m align algo=sft` runs.
`--model` picks the shape:
- `smollm-135m` (the default): HuggingFaceTB/SmolLM-135M, LlamaForCausalLM, 30 layers, hidden
  576, 9 heads / 3 KV heads, MLP 1,536, vocabulary 49,152, tied embeddings; 135M parameters.
- `qwen2-0.5b`: Qwen/Qwen2-0.5B, 24 layers, hidden 896, 14 heads / 2 KV heads, MLP 4,864,
  vocabulary 151,936, tied embeddings; 494M parameters.

Why these defaults (`--model smollm-135m --batch 4 --tokens 1024 --steps 2`): checkpointing
saves activations, while a whole-process peak also carries the state that no knob here removes
(16 bytes per parameter: fp32 weights, gradients and AdamW's two moments). Qwen2-0.5B's state is
7.4 GiB, 28% of it its 151,936-token embedding, against ~2.5 GiB of activations per 1,024-token
sequence, so its peak ratio stays at 0.89 for one sequence and 0.76 for two (README). SmolLM-135M
(deep and narrow: 30 layers of width 576, a 49k vocabulary) holds 2.0 GiB of state, and its
activations outweigh that once a micro-batch has a few sequences. Measured, peak above imports
off -> on: one 1,024-token sequence 3.46 -> 2.68 GiB (0.77); four, a common SFT micro-batch,
9.00 -> 4.62 GiB (0.51; 0.54 in a second run), under the issue's 0.6 target with margin. 4 also
splits evenly over the fsdp2 section's 2 ranks. A full default run took 17-22 minutes on a shared,
loaded 2-core machine (`--batch 8` would double the compute).

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

The fsdp2 section trains the same model as 2 FSDP2 ranks (gloo, `TrainEngine(strategy="fsdp2")`,
each rank its half of the batch) against 1 unsharded rank on the whole batch; that one rank is
the checkpointing section's `off` configuration, run once and reported in both. Per rank
it reports the bytes of the parameters, gradients and AdamW states the rank holds (its shards:
summed over the tensors, exact), its peak RSS, and tokens/s (both ranks' tokens over the
slowest rank's fastest step). `fsdp2_state_ratio` = a rank's state bytes / the unsharded
rank's (ideal 0.5; FSDP2 pads each shard to equal size). As the trainers do
(`TrainEngine.init_on_meta`), rank 0 builds the whole model and rank 1 builds it on the meta
device; `prepare` scatters rank 0's weights into rank 1's shards. `fsdp2_load_peak_ratio_by_rank`
is each rank's peak RSS once prepared (built, sharded, filled) over the one rank's: rank 0 held
the whole model while scattering it, rank 1 only its shards and one whole parameter at a time;
`fsdp2_load_peak_ratio_by_rank_every_rank_builds` is the same with both ranks building the
whole model (the loading before rank-0 filling; no training), measured in the same run.
`fsdp2_peak_ratio` is the larger rank's peak RSS over the run, `fsdp2_peak_ratio_by_rank` both.

    python scripts/bench_scale.py                      # both sections, SmolLM-135M, 4 x 1,024 tokens
    python scripts/bench_scale.py --model qwen2-0.5b --batch 2 --only checkpointing  # Qwen2-0.5B's shape
    python scripts/bench_scale.py --layers 2 --tokens 128 --steps 1   # a smoke run (~2 minutes)

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

# The published config.json keys that shape each model (random weights are built from them).
# Qwen2-0.5B: huggingface.co/Qwen/Qwen2-0.5B (494M parameters, 136M of them the tied embedding).
QWEN2_0_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=1000000.0,
    rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
    use_sliding_window=False, sliding_window=131072, max_window_layers=24,
)
# SmolLM-135M: huggingface.co/HuggingFaceTB/SmolLM-135M (LlamaForCausalLM; 135M parameters, 28M of
# them the tied embedding).
SMOLLM_135M = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, rope_theta=10000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
    attention_bias=False, mlp_bias=False,
)
MODELS = {"smollm-135m": ("SmolLM-135M", SMOLLM_135M), "qwen2-0.5b": ("Qwen2-0.5B", QWEN2_0_5B)}


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


def build_model(args, meta: bool = False):
    """MODELS[args.model]'s shape (`--layers` decoder layers when set) with random weights (seed 0),
    fp32, in training mode; `meta`: on the meta device (no memory, for `prepare` to fill)."""
    import contextlib

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(MODELS[args.model][1])
    if args.layers:
        config["num_hidden_layers"] = args.layers
        if "max_window_layers" in config:
            config["max_window_layers"] = args.layers
    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).train()


def _sft_batch(args, vocab: int):
    import torch

    from align.trainers.sft import SFTBatch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (args.batch, args.tokens), generator=g)
    labels = ids.clone()
    labels[:, : args.tokens // 4] = -100  # a prompt: the loss on the last three quarters
    return SFTBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def allocate_optimizer_state(optimizer, trainable) -> None:
    """Allocate AdamW's moments now (one step at lr 0 on zero gradients), so that what the process
    holds between steps is weights + optimizer state before the first measured step."""
    import torch

    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr


def state_bytes(model, optimizer) -> int:
    """Bytes of the parameters, gradients and optimizer states this process holds (a shard's
    local part when sharded)."""
    import torch

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    total = 0
    for p in model.parameters():
        total += local(p).numel() * local(p).element_size()
        if p.grad is not None:
            total += local(p.grad).numel() * local(p.grad).element_size()
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                total += local(v).numel() * local(v).element_size()
    return total


def _fsdp2_rank(rank: int, args, port: int, out_dir: str) -> None:
    """One rank of the fsdp2 configuration (a process of its own); writes its figures as JSON."""
    os.environ["OMP_NUM_THREADS"] = str(max(1, args.threads // 2))
    import torch
    import torch.distributed as dist

    from align.engine import TrainEngine
    from align.trainers.sft import SFTBatch, token_nll

    torch.set_num_threads(max(1, args.threads // 2))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    baseline = _status("VmRSS")
    meta = TrainEngine.init_on_meta("fsdp2", rank, 2) and not args.every_rank_builds  # rank 1: on meta
    model = build_model(args, meta=meta)
    engine = TrainEngine("fp32", "cpu", strategy="fsdp2")
    engine.prepare(model)
    loaded = _status("VmHWM") - baseline  # the peak of building, sharding and filling the model
    if args.every_rank_builds:  # the loading before rank-0 filling: each rank builds it whole
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"rank": rank, "load_peak_bytes": loaded}))
        dist.destroy_process_group()
        return
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    allocate_optimizer_state(optimizer, trainable)  # as child_train, so the two runs' steps compare
    whole = _sft_batch(args, model.config.vocab_size)
    rows = slice(rank * args.batch // 2, (rank + 1) * args.batch // 2)
    batch = SFTBatch(whole.input_ids[rows], whole.attention_mask[rows], whole.labels[rows])
    norm = float((whole.labels[:, 1:] != -100).sum())
    times, losses = [], []
    for _ in range(args.steps):
        dist.barrier()
        start = time.perf_counter()
        nll, mask = engine.forward(token_nll, model, batch)
        loss = nll.sum() / norm
        loss.backward()
        held = state_bytes(model, optimizer)  # parameters + gradients + optimizer states (after step 1)
        engine.step(trainable, optimizer, 1.0)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = _status("VmHWM")
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "state_bytes": held, "load_peak_bytes": loaded, "peak_bytes": peak - baseline, "step_seconds": [round(t, 2) for t in times],
        "tokens": batch.input_ids.numel(), "losses": losses}))
    dist.destroy_process_group()


def child_fsdp2(args) -> dict:
    """2 fsdp2 ranks as spawned processes; their figures."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s, tempfile.TemporaryDirectory() as out:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.start_processes(_fsdp2_rank, args=(args, port, out), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    if args.every_rank_builds:
        return {"ranks": ranks}
    slowest = max(min(r["step_seconds"]) for r in ranks)
    return {"ranks": ranks, "tokens_per_s": round(sum(r["tokens"] for r in ranks) / slowest, 2)}


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
    loaded = _status("VmHWM") - baseline
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    allocate_optimizer_state(optimizer, trainable)  # held = weights + optimizer state
    batch = _sft_batch(args, model.config.vocab_size)
    held = _status("VmRSS")
    _reset_peak()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        nll, mask = token_nll(model, batch)
        loss = (nll * mask).sum() / mask.sum()
        loss.backward()
        state = state_bytes(model, optimizer)
        engine.step(trainable, optimizer, 1.0)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = _status("VmHWM")
    tokens = args.batch * args.tokens
    return {
        "checkpointing": args.checkpointing, "params": params, "layers": model.config.num_hidden_layers,
        "batch": args.batch, "tokens": args.tokens, "threads": args.threads,
        "baseline_bytes": baseline, "load_peak_bytes": loaded, "held_bytes": held - baseline, "peak_bytes": peak - baseline,
        "step_peak_bytes": peak - held, "state_bytes": state, "step_seconds": [round(t, 2) for t in times],
        "tokens_per_s": round(tokens / min(times), 2), "losses": losses,
    }


CHILDREN = {"train": child_train, "fsdp2": child_fsdp2}


_RUNS: dict[tuple, dict] = {}  # (kind, *extra) -> its figures: a configuration two sections share runs once


def run_child(kind: str, args, extra: list[str]) -> dict:
    """Run CHILDREN[kind] in a fresh process of this script (same arguments, plus `extra`); a
    configuration already run in this invocation returns its figures again."""
    key = (kind, *extra)
    if key not in _RUNS:
        _RUNS[key] = _run_child(kind, args, extra)
    return _RUNS[key]


def _run_child(kind: str, args, extra: list[str]) -> dict:
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


def section_fsdp2(args) -> dict:
    """1 unsharded rank on the whole batch vs 2 fsdp2 ranks on half each, one process per rank."""
    if args.batch % 2:
        raise SystemExit("--only fsdp2 needs an even --batch (each of the 2 ranks trains on half of it)")
    one = run_child("train", args, [])
    two = run_child("fsdp2", args, [])
    every = run_child("fsdp2", args, ["--every-rank-builds"])
    worst = max(r["state_bytes"] for r in two["ranks"])
    return {
        "fsdp2_state_ratio": round(worst / one["state_bytes"], 4),
        "fsdp2_peak_ratio": round(max(r["peak_bytes"] for r in two["ranks"]) / one["peak_bytes"], 4),
        "fsdp2_peak_ratio_by_rank": [round(r["peak_bytes"] / one["peak_bytes"], 4) for r in two["ranks"]],
        "fsdp2_load_peak_ratio_by_rank": [round(r["load_peak_bytes"] / one["load_peak_bytes"], 4) for r in two["ranks"]],
        "fsdp2_load_peak_ratio_by_rank_every_rank_builds": [round(r["load_peak_bytes"] / one["load_peak_bytes"], 4)
                                                            for r in every["ranks"]],
        "fsdp2_tokens_per_s": {"one_rank": one["tokens_per_s"], "two_ranks": two["tokens_per_s"]},
        "fsdp2_same_losses": all(abs(a - b) <= 1e-4 * abs(a) for a, b in
                                 zip(one["losses"], [x + y for x, y in zip(*(r["losses"] for r in two["ranks"]))])),
        "fsdp2": {"one_rank": one, "two_ranks": two},
    }


SECTIONS = {"checkpointing": section_checkpointing, "fsdp2": section_fsdp2}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {list(SECTIONS)}")
    p.add_argument("--model", choices=sorted(MODELS), default="smollm-135m", help="whose published shape to build")
    p.add_argument("--layers", type=int, default=0, help="override the number of decoder layers (0: the config's)")
    p.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    p.add_argument("--steps", type=int, default=2, help="timed training steps per configuration")
    p.add_argument("--threads", type=int, default=max(1, len(os.sched_getaffinity(0))))
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--every-rank-builds", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        sys.path.insert(0, str(REPO))
        print(json.dumps(CHILDREN[args.child](args)))
        return 0
    args.argv = [a for a in argv if a not in ("--checkpointing", "--every-rank-builds")]
    result = {"bench": "scale", "model": f"{MODELS[args.model][0]} shape, random weights", "finetune": "full",
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
