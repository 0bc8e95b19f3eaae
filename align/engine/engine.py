"""`TrainEngine`: the data-parallel strategy, precision, gradient reduction, clipping and the step.

    engine = TrainEngine(precision="bf16-mixed", device="cuda", strategy="fsdp2")
    engine.prepare(model)                  # fp32 master weights; under ddp/fsdp2, FSDP2 units
    with engine.autocast():                # compute precision (a no-op under ddp/fsdp2: their policy casts)
        loss = engine.forward(token_nll, model, batch)[0].sum()   # any function of the model
    engine.backward(loss, last=True)       # loss.backward(); ddp: all-reduce on the step's last micro-batch only
    grad_norm = engine.step(params, optimizer, max_grad_norm)   # clip, step (backward reduced)

Strategy (`trainer.strategy`; torchtitan and veRL's FSDP workers are the models):
- `single`: one process holds the whole model (the CPU default). No process group.
- `ddp`: every replica holds the whole model, gradients and optimizer state. It runs on FSDP2's
  machinery with shards of one: `fully_shard` over a 2-D (replicas, 1) DeviceMesh, i.e. hybrid
  sharding (below) whose shard groups are single replicas, so nothing is divided and each unit's
  gradients are all-reduced (SUMmed) over the replicas by FSDP2's backward hooks as soon as that
  unit's backward ends, overlapping the rest of the backward (the per-bucket all-reduce of
  torch's DistributedDataParallel). Parameters are DTensors whose local tensor is the whole
  parameter (placements Replicate, Shard(0) over a mesh dimension of size 1). torch's
  `replicate` (torch.distributed._composable.replicate_with_fsdp) does the same reduction but
  keeps a copy of every unit's parameters from its forward to its backward (no resharding after
  forward); shards of one copy one unit at a time, as fsdp2 gathers.
- `fsdp2`: PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard` over a 1-D DeviceMesh; Zhao et
  al. 2023, "PyTorch FSDP", https://arxiv.org/abs/2304.11277). With `shard_size` (trainer.
  fsdp_shard_size) smaller than the replicas, hybrid sharding over a 2-D mesh: each group of
  `shard_size` replicas (a node, say) shards, the groups replicate and all-reduce (HSDP).
  Parameters, gradients and optimizer state are sharded on dim 0; a unit's parameters are
  all-gathered for its forward and backward, and its gradients reduce-scattered.

Under both (`TrainEngine.hooked`), each decoder layer (the model's `_no_split_modules`, as veRL's
wrap policy) is one unit, and a root unit over the whole model holds the rest (embeddings, final
norm, LM head, value and score heads); gradients are summed, never averaged (the loss is already
each replica's share of the step's, see below). Every computation on the model goes through
`engine.forward(fn, ...)`, which runs `fn` inside the root unit's forward so that the root's
parameters are gathered even when `fn` reaches past `model.forward` (our chunked LM-head
log-probs read the head's weight directly). Hook-based reduction needs every replica to run the
same units the same number of times: the trainers give every replica the same number of
micro-batches (`align.engine.distributed.all_max`) and the same decoder passes, and forward
passes on empty shards are not allowed.

Precision (`trainer.precision`):
- `fp32`: compute in the weights' dtype. A trainable weight stored in bf16/fp16 would be
  stepped by AdamW in bf16 (updates below bf16's resolution vanish; Micikevicius et al. 2018,
  "Mixed Precision Training", https://arxiv.org/abs/1710.03740, Sec. 3.1), so the config refuses
  full fine-tuning of a half-precision `model.dtype` at fp32 (`align.config`).
- `bf16-mixed`: trainable weights (and so AdamW's moments and the gradients) are fp32 master
  copies. Under `single`, the forward runs under `torch.autocast(bfloat16)`: matmuls in bf16,
  reductions and norms in fp32. Under ddp and fsdp2 it is FSDP2's `MixedPrecisionPolicy`
  (param_dtype=bf16, reduce_dtype=fp32): the gathered parameters are bf16 copies of the fp32
  shards and gradients are reduced in fp32. Frozen weights (a LoRA base) stay in `model.dtype`,
  their storage dtype. No loss scaling: bf16 has fp32's exponent range.

Gradient accumulation: the trainers call `engine.backward(loss, last=...)` for each micro-batch
of a step. Where gradients are all-reduced over replicas (ddp; fsdp2's hybrid sharding), the
backward hooks skip the all-reduce on every micro-batch but the step's last, which reduces the
sum of all of them (FSDP2's `set_requires_all_reduce`: DDP's `no_sync`, one all-reduce per unit
per step instead of one per micro-batch). fsdp2's reduce-scatter still runs on every micro-batch,
so that no replica holds a whole unsharded gradient between them.

Data parallelism: replica r's loss is its share of the whole batch's loss (a global normaliser,
`align.core.loss_normaliser`), so gradients are SUMmed over the replicas, never averaged; every
replica then takes the same step, and N replicas equal one replica on the whole batch.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16-mixed")
STRATEGIES = ("single", "ddp", "fsdp2")


class _Root(nn.Module):
    """The ddp/fsdp2 root unit: owns the model, and its forward runs any function of it, so that the
    root's parameters are gathered for the function's duration (and its gradients reduced after
    the backward that follows)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        return fn(*args, **kwargs)


class TrainEngine:
    """The optimisation side of one model replica.

    precision: one of PRECISIONS. device: where the model's parameters are (its type picks the
    autocast backend and the mesh's device). strategy: one of STRATEGIES. world_size: replicas in
    the default process group (None: read it from torch.distributed; 1 without a group).
    activation_checkpointing: `prepare` checkpoints every decoder layer
    (`trainer.gradient_checkpointing`; align/models/checkpointing.py).
    """

    def __init__(self, precision: str = "fp32", device: str | torch.device = "cpu", world_size: int | None = None,
                 strategy: str = "single", activation_checkpointing: bool = False, shard_size: int | None = None):
        from align.engine import distributed

        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision: {precision!r} is not one of {list(PRECISIONS)}")
        if strategy not in STRATEGIES:
            raise ValueError(f"trainer.strategy: {strategy!r} is not one of {list(STRATEGIES)}")
        self.precision = precision
        self.device_type = torch.device(device).type
        self.world_size = distributed.world_size() if world_size is None else world_size
        if strategy == "single" and self.world_size > 1:
            raise ValueError(f"trainer.strategy=single holds one replica, but {self.world_size} run: "
                             "use trainer.strategy=ddp or fsdp2")
        # One replica without a process group has nothing to share (a group of one, as on one GPU,
        # keeps the strategy: FSDP2 then runs its machinery over a mesh of one).
        self.strategy = strategy if self.world_size > 1 or distributed.initialized() else "single"
        self.activation_checkpointing = activation_checkpointing
        self.shard_size = shard_size or self.world_size
        if self.world_size % self.shard_size:
            raise ValueError(f"trainer.fsdp_shard_size={shard_size} must divide the {self.world_size} replicas")
        self.device = torch.device(device)
        self._root: nn.Module | None = None
        # Whether `prepare` filled replicas built on the meta device from rank 0 (`init_on_meta`).
        self.materialized = False

    @property
    def sharded(self) -> bool:
        """Whether parameters, gradients and optimizer state are divided over the replicas (fsdp2)."""
        return self.strategy == "fsdp2"

    @property
    def hooked(self) -> bool:
        """Whether the model runs as FSDP2 units whose backward hooks reduce the gradients (ddp,
        fsdp2 with a process group): every replica must then run the same units the same number
        of times, parameters are DTensors, and the precision policy is FSDP2's."""
        return self.strategy in ("ddp", "fsdp2")

    # ---- set-up ------------------------------------------------------------------------------
    @staticmethod
    def init_on_meta(strategy: str, rank: int, world_size: int) -> bool:
        """Whether this replica should build its model on the meta device (no memory, no weights
        read) and let `prepare` fill it from rank 0: every replica but rank 0 under ddp and fsdp2
        (veRL's and accelerate's rank-0 loading). Only rank 0 then holds the whole model, once,
        while it scatters it; the others never do (fsdp2: their shards and one whole parameter at
        a time), where every replica used to read and build it in full before sharding."""
        return strategy in ("ddp", "fsdp2") and world_size > 1 and rank != 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Apply activation checkpointing (every decoder layer wrapped), the precision policy (under
        bf16-mixed every trainable parameter becomes an fp32 master weight) and the strategy (ddp:
        replicas start from rank 0's weights, then whole FSDP2 units; fsdp2: sharded units), in
        place, before the optimizer is built. Replicas built on the meta device (`init_on_meta`)
        are allocated and filled from rank 0's model here: its parameters scattered into the
        others' shards (ddp: broadcast), its buffers broadcast. Returns the model."""
        from align.engine import distributed

        on_meta = any(t.is_meta for t in _tensors(model))
        # Every replica must agree on whether to fill from rank 0 (a collective either way).
        self.materialized = self.hooked and self.world_size > 1 and bool(distributed.all_max(int(on_meta)))
        if on_meta and not self.materialized:
            raise ValueError("a model built on the meta device needs ddp or fsdp2 replicas to fill it from rank 0")
        if self.activation_checkpointing:
            from align.models.checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        if self.precision == "bf16-mixed":
            for p in model.parameters():
                if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        if self.strategy == "ddp" and self.world_size > 1 and not self.materialized:
            fill_from_rank0(model, self.device)  # replicas built for real: rank 0's weights on every one
        if self.hooked:
            self._root = self._shard(model, fill=self.materialized, on_meta=on_meta)
        if self.materialized:
            self._fill_buffers_from_rank0(model)
        return model

    @torch.no_grad()
    def _scatter_from_rank0(self, model: nn.Module, names: list[str], whole: dict[str, torch.Tensor] | None) -> None:
        """Scatter rank 0's whole parameters `names` (`whole`: rank 0's, None on the others) into
        every replica's shards, one at a time: a receiving replica holds one whole parameter at a
        time, rank 0 frees each whole one once sent."""
        from torch.distributed.tensor import distribute_tensor

        params = dict(model.named_parameters())
        for name in names:
            p = params[name]
            src = (whole.pop(name).to(self.device, p.dtype) if whole is not None
                   else torch.empty(p.shape, dtype=p.dtype, device=self.device))
            p.copy_(distribute_tensor(src, p.device_mesh, p.placements, src_data_rank=0))
            del src

    @torch.no_grad()
    def _fill_buffers_from_rank0(self, model: nn.Module) -> None:
        """Rank 0's buffers (rotary frequencies, say) and RNG state on every replica."""
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=0)
        # Rank 0's build drew random initial values (heads, adapters) that the others' did not:
        # its generator state is what every replica would hold after building the same model.
        states = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if self.device_type == "cuda" else [])
        for state in states:
            dist.broadcast(state, src=0)
        torch.set_rng_state(states[0])
        if self.device_type == "cuda":
            torch.cuda.set_rng_state(states[1])

    def _shard(self, model: nn.Module, fill: bool = False, on_meta: bool = False) -> nn.Module:
        """FSDP2 units over `model`: each decoder layer, then the root. `fill`: replicas built on
        the meta device get rank 0's parameters. Rank 0 scatters each unit's as soon as it is
        sharded, so it holds whole parameters only for what is not sharded yet (never the whole
        model beside its shards); `on_meta` replicas shard everything (no memory), allocate their
        shards, then receive the same parameters in the same order."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        shard = self.shard_size if self.sharded else 1  # ddp: shards of one replica, whole
        if shard == self.world_size and self.sharded:  # full shard over every replica
            mesh = init_device_mesh(self.device_type, (self.world_size,))
        else:  # hybrid: shards within groups of `shard` replicas, the groups replicate (HSDP; ddp)
            mesh = init_device_mesh(self.device_type, (self.world_size // shard, shard),
                                    mesh_dim_names=("replicate", "shard"))
        kw: dict[str, Any] = {"mesh": mesh}
        if self.precision == "bf16-mixed":
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        blocks = set()
        for m in model.modules():
            blocks.update(getattr(m, "_no_split_modules", None) or ())
        units = [m for m in model.modules() if type(m).__name__ in blocks]
        # Rank 0's whole parameters (references: sharding replaces them in the model), to scatter.
        whole = dict(model.named_parameters()) if fill and not on_meta else None
        seen: set[str] = set()
        batches: list[list[str]] = []  # the parameters each fully_shard call took, in order

        def shard(module: nn.Module) -> nn.Module:
            out = fully_shard(module, **kw)
            if fill:
                batch = [n for n, p in model.named_parameters() if n not in seen and hasattr(p, "device_mesh")]
                seen.update(batch)
                batches.append(batch)
                if whole is not None:
                    self._scatter_from_rank0(model, batch, whole)
            return out

        for unit in units:
            shard(unit)
        root = shard(_Root(model))
        if fill and on_meta:
            to_empty(root, self.device)
            for batch in batches:
                self._scatter_from_rank0(model, batch, None)
        for unit in units + [root]:
            unit.set_gradient_divide_factor(1.0)  # the losses are shares of the step's: sum, not average
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        return root

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward's compute precision: bf16 autocast under bf16-mixed (single), nothing under
        fp32, ddp or fsdp2 (whose mixed-precision policy gathers bf16 parameters)."""
        if self.precision == "bf16-mixed" and not self.hooked:
            with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
                yield
        else:
            yield

    def forward(self, fn: Callable[..., Any], *args, **kwargs):
        """`fn(*args, **kwargs)`, a computation on the prepared model: inside the root unit's
        forward under ddp and fsdp2 (see the module docstring), a plain call otherwise."""
        if self._root is None:
            return fn(*args, **kwargs)
        out = self._root(fn, *args, **kwargs)
        if not torch.is_grad_enabled():  # no backward will reshard the root's parameters
            self._root.reshard()
        return out

    @contextlib.contextmanager
    def gathered(self, model: nn.Module, writeback: bool = False) -> Iterator[nn.Module]:
        """`model` with whole parameters for the duration (fp32 masters gathered from their shards;
        a collective: every replica enters it), for what reads weights outside a forward: saving,
        exporting, building a merged rollout copy. `writeback`: what the block wrote into them
        (loading a checkpoint) goes back into the shards. Under ddp the whole values are the
        local tensors themselves (no copy: writes land even without `writeback`); under single,
        the model as it is."""
        if not self.hooked:
            yield model
            return
        swaps, whole, hooks = [], {}, []
        if writeback:  # FSDP2's post-load hooks expect its own shards in place: they come back on exit
            for module in model.modules():
                if module._load_state_dict_post_hooks:
                    hooks.append((module, module._load_state_dict_post_hooks.copy()))
                    module._load_state_dict_post_hooks.clear()
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and hasattr(p, "full_tensor"):
                    if id(p) not in whole:  # tied weights stay tied
                        whole[id(p)] = nn.Parameter(full_tensor(p.detach()), requires_grad=p.requires_grad)
                    swaps.append((module, name, p))
                    module._parameters[name] = whole[id(p)]
        try:
            yield model
        finally:
            for module, name, p in swaps:
                full = module._parameters[name]
                module._parameters[name] = p
                if writeback:
                    load_full_tensor(p, full.detach())
            for module, saved in hooks:
                module._load_state_dict_post_hooks.update(saved)

    # ---- the step ----------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, last: bool = True) -> None:
        """`loss.backward()` for one micro-batch of a step; `last`: whether it is the step's last.
        Under ddp and hybrid-sharded fsdp2 the replicas' all-reduce runs in the last one's
        backward only, on the gradients summed over the step's micro-batches (every replica must
        then agree on which micro-batch is last: the trainers give them the same count)."""
        if self._root is not None and (not self.sharded or self.shard_size < self.world_size):
            self._root.set_requires_all_reduce(last)
        loss.backward()

    def step(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
             max_grad_norm: float | None) -> float:
        """Clip the gradients (summed over the replicas in backward under ddp and fsdp2) to
        `max_grad_norm` (0 or None: no clipping, the norm is still returned), step the optimizer
        and clear the gradients. Returns the total gradient norm before clipping."""
        params = list(params)
        if self.hooked:  # a unit whose forward ran on no replica this step leaves no gradient
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _scalar(grad_norm)


@torch.no_grad()
def fill_from_rank0(module: nn.Module, device: str | torch.device) -> None:
    """Give every replica rank 0's copy of a whole (unsharded) module: allocated on `device` where
    it was built on the meta device, then each parameter and buffer broadcast from rank 0 (a
    collective: every replica calls it)."""
    import torch.distributed as dist

    if any(t.is_meta for t in _tensors(module)):
        to_empty(module, device)
    for t in _tensors(module):
        dist.broadcast(t, src=0)


def to_empty(module: nn.Module, device: str | torch.device) -> None:
    """`module.to_empty(device=device)` (uninitialised storage for meta tensors), keeping tied
    parameters tied: torch's gives each module its own copy of a tied meta parameter."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None:
                places.setdefault(id(p), []).append((m, name))
    module.to_empty(device=device)
    for (m0, name0), *rest in places.values():
        for m, name in rest:
            if m._parameters[name] is not m0._parameters[name0]:
                m._parameters[name] = m0._parameters[name0]


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _scalar(t: torch.Tensor) -> float:
    if hasattr(t, "full_tensor"):  # a DTensor (sharded gradients): the norm's value on every rank
        t = t.full_tensor()
    return float(t)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value: gathered from the replicas when it is a shard (a collective:
    every replica calls it, in the same order); its local tensor when that is already whole (ddp's
    shards of one); itself when it is no DTensor."""
    if not hasattr(t, "full_tensor"):
        return t
    if all(p.is_replicate() or (p.is_shard() and t.device_mesh.size(i) == 1) for i, p in enumerate(t.placements)):
        return t.to_local()
    return t.full_tensor()


def load_full_tensor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole value into `param`, taking this replica's shard when the parameter is one."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                      src_data_rank=None)
            param.copy_(value)
        else:
            param.copy_(value.to(param.device, param.dtype))
