"""Reference log-probs for the offline preference losses: computed once, kept on disk, reused.

The DPO family compares the policy with a frozen reference pi_ref on the *same fixed*
sequences every epoch, so log pi_ref(y|x) is a constant of the data set. It is computed once
before training, in eval mode and without gradients, from the one model in memory:

- LoRA: the shared base with every adapter disabled (`model.disable_adapter()`), no copy;
- full fine-tuning: the initial weights, i.e. the policy itself before its first update (on
  resume the trainer runs this before loading the checkpoint, or finds it in the cache).

The result is written to `<cache_dir>/<key>.safetensors`, where `key` is a sha256 over
everything that decides the numbers: the model (path, dtype, quantization, its config and the
size and mtime of its weight files), the tokenizer's name, and the token ids of every
(prompt, response) sequence, which carry the data source, its rows, the tokenisation and the
length limits. A later run with the same key loads the file instead of running the model.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch

from align.trainers.logps import collate_sequences, response_logps

CACHE_VERSION = 1  # bump when the way log-probs are computed changes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")

# One (prompt_ids, response_ids) sequence whose response log-prob is wanted.
Seq = tuple[Sequence[int], Sequence[int]]


@contextmanager
def reference_mode(model: torch.nn.Module):
    """The model as the reference: eval mode, no gradients, LoRA adapters off (when it has them)."""
    was_training = model.training
    adapters_off = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    model.eval()
    try:
        with torch.no_grad(), adapters_off:
            yield model
    finally:
        model.train(was_training)


def compute_logps(model: torch.nn.Module, seqs: Sequence[Seq], pad_id: int, batch_size: int) -> torch.Tensor:
    """(N,) summed response log-probs of `seqs` under `model` as it is called (wrap it in
    `reference_mode` for the reference). Sequences are batched by length to waste little on
    padding; the output keeps the input order."""
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
    out = torch.empty(len(seqs), dtype=torch.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate_sequences([seqs[i] for i in idx], pad_id).items()}
        logps, _ = response_logps(model, **batch)
        out[idx] = logps.float().cpu()
    return out


def model_fingerprint(model_cfg) -> dict:
    """What identifies the reference weights: path, dtype, quantization and, for a local
    folder, its config.json and the size and mtime of its weight files."""
    info = {"name_or_path": str(model_cfg.name_or_path), "dtype": model_cfg.dtype,
            "quantization": model_cfg.quantization}
    path = Path(model_cfg.name_or_path)
    if path.is_dir():
        info["name_or_path"] = str(path.resolve())
        config = path / "config.json"
        info["config"] = config.read_text() if config.exists() else None
        info["weights"] = sorted(
            (f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)
        )
    return info


def cache_key(model_cfg, tokenizer_name: str, seqs: Sequence[Seq], layout: str = "") -> str:
    """sha256 hex over the model fingerprint, the tokenizer name, how the forward batches the
    sequences (`layout`: the numbers depend on it in the last bits) and every sequence's ids."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "model": model_fingerprint(model_cfg),
                         "tokenizer": tokenizer_name, "layout": layout}, sort_keys=True).encode())
    for prompt, response in seqs:
        h.update(json.dumps([list(prompt), list(response)]).encode())
        h.update(b"\n")
    return h.hexdigest()


def default_cache_dir() -> Path:
    root = os.environ.get("ALIGN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "align")
    return Path(root) / "reference"


def load_cached(cache_dir: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached (n,) log-probs for `key`, or None (absent, or unreadable: recomputed)."""
    from safetensors.torch import load_file

    path = cache_dir / f"{key}.safetensors"
    if not path.exists():
        return None
    try:
        logps = load_file(str(path))["logps"]
    except Exception:  # a file cut short elsewhere: recompute rather than fail the run
        return None
    return logps if logps.shape == (n,) else None


def save_cached(cache_dir: Path, key: str, logps: torch.Tensor, metadata: dict[str, str]) -> Path:
    """Write atomically (temp file, then rename), so a crash never leaves a torn cache entry."""
    from safetensors.torch import save_file

    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.safetensors"
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    save_file({"logps": logps.contiguous()}, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return path


def reference_logps(model: torch.nn.Module, seqs: Sequence[Seq], compute: Callable[[torch.nn.Module], torch.Tensor],
                    *, model_cfg, tokenizer, cache_dir: str | os.PathLike | None, layout: str = "",
                    description: str = "") -> tuple[torch.Tensor, bool]:
    """(N,) reference log-probs of `seqs`, from the cache when present; returns (logps, hit).

    `compute(model)` runs the forward (called in `reference_mode`: eval, no grad, adapters off)
    and returns the (N,) log-probs in the order of `seqs`; `layout` names how it batches them.
    `cache_dir=None` disables the disk cache. `model` must still hold the reference weights
    (with full fine-tuning, call this before any update).
    """
    from align.engine import distributed

    key = cache_key(model_cfg, getattr(tokenizer, "name_or_path", ""), seqs, layout) if cache_dir is not None else None
    if key is not None:
        cached = load_cached(Path(cache_dir), key, len(seqs))
        # Data-parallel replicas compute together (their forwards are collectives) unless all hit.
        if distributed.all_min(cached is not None):
            return cached, True
    with reference_mode(model):
        logps = compute(model).float().cpu()
    if key is not None and distributed.is_main():
        save_cached(Path(cache_dir), key, logps, {"model": model_cfg.name_or_path, "sequences": len(seqs),
                                                   "layout": layout, "what": description})
    return logps, False
