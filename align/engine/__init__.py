"""The training engine: one place for how a model's parameters are optimised.

Workers host models and run verbs; drivers own the algorithm; the engine owns the rest of an
optimizer step, the same for every stage (SFT, RM, DPO/KTO and the RL workers): the precision
policy (fp32, or bf16 compute over fp32 master weights and optimizer state), the gradient
reduction over data-parallel replicas, clipping and the step. Importing this package imports
torch only.
"""

from align.engine.engine import PRECISIONS, TrainEngine

__all__ = ["PRECISIONS", "TrainEngine"]
