"""`TrainEngine`: precision, gradient reduction, clipping and the optimizer step.

    engine = TrainEngine(precision="bf16-mixed", device="cuda")
    engine.prepare(model)                  # trainable weights become fp32 master weights
    with engine.autocast():                # forward in bf16
        loss = ...
    loss.backward()
    grad_norm = engine.step(params, optimizer, max_grad_norm)   # reduce, clip, step

Precision (`trainer.precision`):
- `fp32`: compute in the weights' dtype. A trainable weight stored in bf16/fp16 would be
  stepped by AdamW in bf16 (updates below bf16's resolution vanish; Micikevicius et al. 2018,
  "Mixed Precision Training", https://arxiv.org/abs/1710.03740, Sec. 3.1), so the config refuses
  full fine-tuning of a half-precision `model.dtype` at fp32 (`align.config`).
- `bf16-mixed`: trainable weights (and so AdamW's moments and the gradients) are fp32 master
  copies; the forward runs under `torch.autocast(bfloat16)`, so matmuls compute in bf16 while
  autocast keeps reductions and norms in fp32. Frozen weights (a LoRA base) stay in
  `model.dtype`, their storage dtype. No loss scaling: bf16 has fp32's exponent range.

Data parallelism: replica r's loss is its share of the whole batch's loss (a global normaliser,
`align.core.loss_normaliser`), so `step` SUMs the gradients over the replicas' process group
before clipping; every replica then takes the same step. The sum is one coalesced all-reduce
per optimizer step, after all of the step's micro-batches, so replicas may run different
numbers of micro-batches and forward paths (hook-based DDP/FSDP reduce per backward pass and
need the same structure on every rank).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16-mixed")


class TrainEngine:
    """The optimisation side of one model replica.

    precision: one of PRECISIONS. device: where the model's parameters are (its type picks the
    autocast backend). world_size: data-parallel replicas in the default process group (1: none).
    activation_checkpointing: `prepare` checkpoints every decoder layer
    (`trainer.gradient_checkpointing`; align/models/checkpointing.py).
    """

    def __init__(self, precision: str = "fp32", device: str | torch.device = "cpu", world_size: int = 1,
                 activation_checkpointing: bool = False):
        if precision not in PRECISIONS:
            raise ValueError(f"trainer.precision: {precision!r} is not one of {list(PRECISIONS)}")
        self.precision = precision
        self.device_type = torch.device(device).type
        self.world_size = world_size
        self.activation_checkpointing = activation_checkpointing

    # ---- set-up ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        """Under bf16-mixed, make every trainable parameter an fp32 master weight (in place, before
        the optimizer is built, so its states are fp32 too); with activation checkpointing, wrap
        every decoder layer in a checkpoint. Returns the model."""
        if self.activation_checkpointing:
            from align.models.checkpointing import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        if self.precision == "bf16-mixed":
            for p in model.parameters():
                if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        return model

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward's compute precision: bf16 autocast under bf16-mixed, nothing under fp32."""
        if self.precision == "bf16-mixed":
            with torch.autocast(device_type=self.device_type, dtype=torch.bfloat16):
                yield
        else:
            yield

    # ---- the step ----------------------------------------------------------------------------
    def step(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer,
             max_grad_norm: float | None) -> float:
        """Sum the gradients over the replicas, clip them to `max_grad_norm` (0 or None: no
        clipping, the norm is still returned), step the optimizer and clear the gradients.
        Returns the total gradient norm before clipping."""
        params = list(params)
        self.reduce_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """SUM each gradient over the replicas (missing gradients count as zeros): one flat
        buffer per dtype, one all-reduce each."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p in group:
                n = p.numel()
                p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
                offset += n
