"""Functions that run inside vLLM's worker process, sent there by `LLM.collective_rpc`.

They live in their own importable module (not as closures in `vllm_engine.py`) because vLLM
pickles a callable by reference when its engine core runs in another process: the worker must
be able to import it by name. They import nothing of vLLM themselves.
"""

from __future__ import annotations

import torch


def reload_from_state_dict(worker, state_dict: dict[str, torch.Tensor]) -> int:
    """Load a full (Hugging Face-named) state dict into the worker's model in place.

    `worker.reload_weights` runs the model's own checkpoint loader over the tensors, so vLLM's
    fused layouts (qkv_proj, gate_up_proj) and the CPU build's repacked weights are rebuilt from
    checkpoint names exactly as at start-up; the model is not re-created. Returns the number of
    tensors handed over (the caller checks it against what it sent).
    """
    weights = [(name, _as_tensor(t)) for name, t in state_dict.items()]
    worker.reload_weights(weights_iterator=iter(weights))
    return len(weights)


def _as_tensor(t) -> torch.Tensor:
    # Through some rpc paths a tensor argument arrives as nested lists; rebuild it then.
    return t if isinstance(t, torch.Tensor) else torch.tensor(t)
