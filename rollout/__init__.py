"""Rollout engines: Hugging Face generate (CPU) and vLLM (GPU) behind one protocol."""

from rollout.base import RolloutEngine, RolloutOutput, RolloutSample, SamplingParams
from rollout.hf import HFEngine  # torch only; transformers and peft are imported when used

__all__ = ["HFEngine", "RolloutEngine", "RolloutOutput", "RolloutSample", "SamplingParams"]
