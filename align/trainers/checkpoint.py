"""Checkpoints that survive a crash, and exact resume.

A checkpoint is a folder `checkpoints/step_<N>/` holding the trainable weights (safetensors),
the optimizer and scheduler states, every RNG state and the trainer's own state (step, data
position) as JSON. It is written into a temporary folder first and renamed into place, so a
SIGKILL mid-write leaves the previous checkpoints whole; `latest` names the newest complete one.
No pickle: tensors go through safetensors or `torch.load(weights_only=True)`, the rest is JSON.

Data-parallel replicas (align/engine): every replica calls `save` and `load` (under fsdp2 the
weights and optimizer state are gathered from, and scattered back to, their shards: collectives),
rank 0 alone writes. Weights and optimizer states are saved whole and keyed by parameter name, so
a checkpoint resumes under any strategy and any number of replicas.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.json"
TORCH_RNG = "torch_rng.pt"
STATE = "trainer_state.json"


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """Python, numpy and torch RNG states: the JSON-able part and the tensor part."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them in full fine-tuning, the adapter's
    with LoRA), whole (gathered from their shards) and cloned so tied weights do not share
    storage in the file."""
    from align.engine import full_tensor

    return {n: full_tensor(p.detach()).cpu().clone().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer`'s state keyed by parameter name, whole (gathered when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore a state from `optimizer_state` (or an older checkpoint's `optimizer.state_dict()`,
    keyed by position) into `optimizer`, sharding it like the parameters."""
    if all(isinstance(i, int) for g in state["param_groups"] for i in g["params"]):
        optimizer.load_state_dict(state)
        return
    # Name -> the optimizer's own positional ids; a sharded parameter's states (exp_avg, ...)
    # become DTensors sharded like it. (torch's set_optimizer_state_dict needs the optimizer to
    # hold states already, and a process group.)
    names = {id(p): n for n, p in model.named_parameters()}
    groups, by_id, position = [], {}, 0
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        ids = []
        for p in group["params"]:
            name = names[id(p)]
            if name in state["state"]:
                by_id[position] = {k: _like(p, v) for k, v in state["state"][name].items()}
            ids.append(position)
            position += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": by_id, "param_groups": groups})


def _like(param: torch.Tensor, value):
    """An optimizer state tensor of `param`'s shape, sharded like `param` when it is a shard."""
    if hasattr(param, "device_mesh") and isinstance(value, torch.Tensor) and value.shape == param.shape:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    from align.engine import load_full_tensor

    for name, p in params.items():
        load_full_tensor(p, state[name])


class Checkpointer:
    """Writes and finds checkpoints under `<output_dir>/checkpoints`, keeping the newest `keep`."""

    def __init__(self, output_dir: str | os.PathLike, keep: int = 2):
        self.root = Path(output_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if (path / STATE).exists():
                return path
        done = sorted(
            (p for p in self.root.glob("step_*") if (p / STATE).exists()),
            key=lambda p: int(p.name.split("_")[1]),
        )
        return done[-1] if done else None

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
        trainer_state: dict,
        extra_tensors: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune the oldest beyond `keep` (every replica
        calls it; rank 0 writes)."""
        from align.engine import distributed

        final = self.root / f"step_{step}"
        tensors = trainable_state(model)
        optimizer_states = {k: optimizer_state(model, o) for k, o in optimizers.items()}
        if not distributed.is_main():
            distributed.barrier()  # rank 0 is writing
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if extra_tensors:
            tensors.update({f"extra::{k}": v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
        save_file(tensors, str(tmp / TRAINABLE))
        torch.save(optimizer_states, tmp / OPTIMIZER)
        torch.save({k: s.state_dict() for k, s in schedulers.items()}, tmp / SCHEDULER)
        plain, rng_tensors = rng_state()
        (tmp / RNG).write_text(json.dumps(plain))
        torch.save(rng_tensors, tmp / TORCH_RNG)
        (tmp / STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = self.root / ".latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, self.root / "latest")
        self._prune()
        distributed.barrier()
        return final

    def load(
        self,
        path: Path,
        *,
        model: torch.nn.Module,
        optimizers: dict[str, torch.optim.Optimizer],
        schedulers: dict[str, Any],
    ) -> tuple[dict, dict[str, torch.Tensor]]:
        """Restore everything saved by `save`; returns (trainer_state, extra_tensors)."""
        tensors = load_file(str(path / TRAINABLE))
        extra = {k.split("::", 1)[1]: v for k, v in tensors.items() if k.startswith("extra::")}
        load_trainable_state(model, {k: v for k, v in tensors.items() if not k.startswith("extra::")})
        opt_states = torch.load(path / OPTIMIZER, weights_only=True)
        for k, o in optimizers.items():
            load_optimizer_state(model, o, opt_states[k])
        sched_states = torch.load(path / SCHEDULER, weights_only=True)
        for k, s in schedulers.items():
            s.load_state_dict(sched_states[k])
        set_rng_state(json.loads((path / RNG).read_text()), torch.load(path / TORCH_RNG, weights_only=True))
        return json.loads((path / STATE).read_text()), extra

    def _prune(self) -> None:
        done = sorted(
            (p for p in self.root.glob("step_*") if (p / STATE).exists()),
            key=lambda p: int(p.name.split("_")[1]),
        )
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
