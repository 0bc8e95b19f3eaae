"""Checkpoints that survive a crash, and exact resume.

A checkpoint is a folder `checkpoints/step_<N>/` holding the trainable weights (safetensors),
the optimizer and scheduler states, every RNG state and the trainer's own state (step, data
position) as JSON. It is written into a temporary folder first and renamed into place, so a
SIGKILL mid-write leaves the previous checkpoints whole; `latest` names the newest complete one.
No pickle: tensors go through safetensors or `torch.load(weights_only=True)`, the rest is JSON.

Data-parallel replicas (align/engine): every replica calls `save` and `load` (collectives).
With more than one replica the trainable weights and the optimizer states are written sharded,
with PyTorch Distributed Checkpoint (DCP, as torchtitan and veRL do): each replica writes the
shards it holds into `sharded/` (one `__<rank>_0.distcp` file each, beside DCP's `.metadata`
index), so no process ever gathers the whole model or optimizer. The keys are
`model/<parameter name>` and `optimizer/<optimizer>/<parameter name>/<state>` (param groups in
`optimizer_groups.json`), so DCP reshards on load: a checkpoint written by N replicas resumes
under any strategy and any number of replicas, one process without a process group included
(`load_sharded`); `read_trainable` reads either format's weights whole. Rank 0 writes the rest
(scheduler, RNG, trainer state). The output folder must be one filesystem every replica sees (a
shared mount across nodes). DCP's `.metadata` is a pickle: it is read by a restricted unpickler
that admits DCP's metadata classes and nothing else (`_MetadataUnpickler`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import random
import shutil
import warnings
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
SHARDED = "sharded"  # DCP: trainable weights and optimizer states, a file per replica
GROUPS = "optimizer_groups.json"
EXTRA = "extra.safetensors"


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


def _check_names(params, saved, where: str = "checkpoint") -> None:
    """Raise when the saved trainable names are not exactly the model's."""
    missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or unexpected:
        raise RuntimeError(f"{where} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    _check_names(params, state)
    from align.engine import load_full_tensor

    for name, p in params.items():
        load_full_tensor(p, state[name])


# ---- the sharded format (DCP) ---------------------------------------------------------------------


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_sharded(path: str | os.PathLike, model: torch.nn.Module,
                 optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Write `model`'s trainable weights and the optimizers' states under `path/sharded` with DCP,
    each replica its own shards (a collective: every replica calls it; a process without a group
    writes alone). Rank 0 writes the optimizers' param groups as JSON."""
    import torch.distributed.checkpoint as dcp

    from align.engine import distributed

    params = _trainable(model)
    names = {id(p): n for n, p in params.items()}
    state: dict[str, torch.Tensor] = {f"model/{n}": p.detach() for n, p in params.items()}
    groups: dict[str, list] = {}
    for key, opt in optimizers.items():
        for p, entries in opt.state.items():
            for k, v in entries.items():
                if isinstance(v, torch.Tensor):
                    state[f"optimizer/{key}/{names[id(p)]}/{k}"] = v
        groups[key] = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
                       for g in opt.param_groups]
    with _alone_quietly():
        dcp.save(state, checkpoint_id=str(Path(path) / SHARDED), no_dist=not distributed.initialized())
    if distributed.is_main():
        (Path(path) / GROUPS).write_text(json.dumps(groups, indent=1))


def load_sharded(path: str | os.PathLike, model: torch.nn.Module,
                 optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """Restore what `save_sharded` wrote into `model` and `optimizers`, as they are distributed now
    (any number of replicas, sharded or whole: DCP reads each replica's part of every tensor). A
    collective under replicas; one process without a group reads alone."""
    import torch.distributed.checkpoint as dcp

    from align.engine import distributed

    folder = Path(path) / SHARDED
    saved = _safe_reader(str(folder)).read_metadata().state_dict_metadata
    params = _trainable(model)
    _check_names(params, [k[len("model/"):] for k in saved if k.startswith("model/")], f"checkpoint {path}")
    targets: dict[str, torch.Tensor] = {f"model/{n}": p.detach() for n, p in params.items()}
    states: list[tuple[torch.optim.Optimizer, torch.Tensor, str, str]] = []
    for key, meta in saved.items():  # optimizer/<optimizer>/<parameter name>/<state>
        kind, _, rest = key.partition("/")
        opt_key, _, rest = rest.partition("/")
        if kind == "optimizer" and opt_key in optimizers:
            name, _, k = rest.rpartition("/")
            targets[key] = _empty_like_saved(params[name], meta)
            states.append((optimizers[opt_key], params[name], k, key))
    with _alone_quietly():
        dcp.load(targets, checkpoint_id=str(folder), storage_reader=_safe_reader(str(folder)),
                 no_dist=not distributed.initialized())
    for opt, p, k, key in states:
        opt.state[p][k] = targets[key]
    groups = json.loads((Path(path) / GROUPS).read_text())
    for key, opt in optimizers.items():
        for group, saved_group in zip(opt.param_groups, groups[key]):
            group.update({k: type(group[k])(v) if isinstance(group.get(k), tuple) else v
                          for k, v in saved_group.items() if k != "params"})


def _empty_like_saved(param: torch.Tensor, meta) -> torch.Tensor:
    """A tensor to load a saved optimizer state into: distributed like `param` when it has the
    parameter's shape (exp_avg, ...) and `param` is a shard; plain otherwise (AdamW's step)."""
    size, dtype = tuple(meta.size), meta.properties.dtype
    if hasattr(param, "device_mesh") and size == tuple(param.shape):
        from torch.distributed.tensor import empty

        return empty(size, dtype=dtype, device_mesh=param.device_mesh, placements=param.placements)
    return torch.empty(size, dtype=dtype, device=param.device)


def read_trainable(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint's trainable weights, whole, by parameter name, whichever format wrote them (in
    one process: a sharded checkpoint's shards are put together)."""
    path = Path(path)
    if not (path / SHARDED).is_dir():
        return {k: v for k, v in load_file(str(path / TRAINABLE)).items() if not k.startswith("extra::")}
    import torch.distributed.checkpoint as dcp

    folder = str(path / SHARDED)
    saved = _safe_reader(folder).read_metadata().state_dict_metadata
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in saved.items() if k.startswith("model/")}
    with _alone_quietly():
        dcp.load(out, checkpoint_id=folder, storage_reader=_safe_reader(folder), no_dist=True)
    return {k[len("model/"):]: v for k, v in out.items()}


@contextlib.contextmanager
def _alone_quietly():
    """DCP warns that it "assumes" one process when there is no process group: here that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` index: DCP's metadata classes, torch sizes and dtypes, paths,
    and nothing else (the shards themselves DCP reads with `torch.load(weights_only=True)`)."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
             ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module: str, name: str):
        if module in self.MODULES or (module, name) in self.NAMES or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata: {module}.{name} is not a metadata class; refusing to load it")


@functools.cache
def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's `FileSystemReader`, its `.metadata` read by `_MetadataUnpickler`."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as stream:
                metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_reader(path: str):
    return _safe_reader_class()(path)


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
        calls it; with replicas each writes its shards, rank 0 the rest)."""
        from align.engine import distributed

        final = self.root / f"step_{step}"
        tmp = self.root / f".tmp_step_{step}"
        sharded = distributed.world_size() > 1
        if sharded:  # each replica writes its own shards into the folder rank 0 made
            if distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            distributed.barrier()
            save_sharded(tmp, model, optimizers)
        else:
            tensors = trainable_state(model)
            optimizer_states = {k: optimizer_state(model, o) for k, o in optimizers.items()}
        if not distributed.is_main():
            distributed.barrier()  # rank 0 is writing
            return final
        if not sharded:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / TRAINABLE))
            torch.save(optimizer_states, tmp / OPTIMIZER)
        if extra_tensors:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()}, str(tmp / EXTRA))
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
        """Restore everything saved by `save`, in either format, under any number of replicas;
        returns (trainer_state, extra_tensors)."""
        extra = load_file(str(path / EXTRA)) if (path / EXTRA).exists() else {}
        if (path / SHARDED).is_dir():
            load_sharded(path, model, optimizers)
        else:
            tensors = load_file(str(path / TRAINABLE))
            load_trainable_state(model, {k: v for k, v in tensors.items() if not k.startswith("extra::")})
            extra.update({k.split("::", 1)[1]: v for k, v in tensors.items()  # older checkpoints kept them here
                          if k.startswith("extra::")})
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
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
