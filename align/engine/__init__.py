"""The training engine: one place for how a model's parameters are optimised.

Workers host models and run verbs; drivers own the algorithm; the engine owns the rest of an
optimizer step, the same for every stage (SFT, RM, DPO/KTO and the RL workers): the
data-parallel strategy (one process, replicated, or FSDP2-sharded), the precision policy (fp32,
or bf16 compute over fp32 master weights and optimizer state), the gradient reduction over
replicas, clipping and the step. `distributed` is the process's data-parallel context;
`spmd` starts a stage on N Ray workers. Importing this package imports torch only.
"""

from align.engine.engine import PRECISIONS, STRATEGIES, TrainEngine, fill_from_rank0, full_tensor, load_full_tensor

__all__ = ["PRECISIONS", "STRATEGIES", "TrainEngine", "fill_from_rank0", "full_tensor", "load_full_tensor"]
