"""Rollout engines: Hugging Face generate (CPU) and vLLM (GPU) behind one protocol."""

from rollout.base import RolloutEngine, RolloutOutput, RolloutSample, SamplingParams

__all__ = ["RolloutEngine", "RolloutOutput", "RolloutSample", "SamplingParams"]
