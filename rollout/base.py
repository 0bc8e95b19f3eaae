"""The rollout engine protocol: one interface over Hugging Face generate (CPU) and vLLM (GPU).

Log-prob convention (both backends, and the trainer): `RolloutSample.logprobs[t]` is the log
probability of `token_ids[t]` under the distribution it was sampled from: log_softmax of the
logits divided by the temperature, after top-k and top-p (vLLM's `processed_logprobs`); raw
log_softmax(logits) when greedy (temperature 0). These are the behaviour policy's log-probs,
mu(y_t), of off-policy RL.

The trainer's side of that agreement: RL runs sample with top-p and top-k off (refused
otherwise, `align.config`), and every RL log-prob (old, reference, training) and entropy is
computed from logits / rollout.temperature (`MultiHeadModel.response_log_probs(...,
temperature=T)`), as veRL and TRL do. In fp32 on CPU the engine's and the trainer's agree
within 1e-4 at any temperature (tests/rollout/test_hf_logprobs.py, tests/vllm_backend/); what
remains (bf16, other kernels, a quantized rollout base) is measured and corrected by
`align.core.rollout_correction`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. `temperature == 0` means greedy; `n` samples per prompt."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: no top-k filtering (vLLM's convention)
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    num_beams: int = 1  # > 1: beam search (evaluation only; HF backend)

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class RolloutSample:
    """One generated response.

    token_ids: (L,) response token ids, stop token included when generation ended on one; on a
               stop string, they end with the token that completed it.
    text:      the response as it reads after the prompt (a leading space kept: prompt text + text
               reads as the whole sequence); a stop token's text and a stop string (and all after) left out.
    logprobs:  (L,) log-probs of those tokens under the sampling distribution (see the module docstring).
    finish_reason: "stop" (stop token, eos or stop string) or "length" (max_new_tokens, or the
               model's context filled).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason


@dataclass
class RolloutOutput:
    """All samples of one `generate` call, `n` per prompt, grouped prompt-major:
    samples[i * n + j] is sample j of prompt i."""

    samples: list[RolloutSample] = field(default_factory=list)
    n: int = 1

    def by_prompt(self) -> list[list[RolloutSample]]:
        return [self.samples[i : i + self.n] for i in range(0, len(self.samples), self.n)]


@runtime_checkable
class RolloutEngine(Protocol):
    """What a driver may ask of a rollout engine.

    Optional, HFEngine only, for streaming: `generate(prompts, params, *, on_step=None)`, where
    `on_step(rows, tokens)` gets each decode step's tokens of the rows still running (rows index
    the prompt-major samples), and `response_text(prompt, ids)`, the text the engine gives a
    response's ids. `streams_tokens(engine)` says whether an engine has both; callers fall back to
    the finished output otherwise (vLLM, Ray-wrapped engines).
    """

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutOutput:
        """Generate `params.n` responses for each prompt (given as token ids, no padding)."""
        ...

    def update_weights(
        self, *, lora: dict[str, torch.Tensor] | None = None, state_dict: dict[str, torch.Tensor] | None = None
    ) -> None:
        """Take new policy weights: a LoRA adapter's tensors (peft naming) or a full state dict."""
        ...

    def sleep(self) -> None:
        """Release cache memory while training runs colocated on the same device."""
        ...

    def wake_up(self) -> None:
        """Retake what `sleep` released."""
        ...


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Character index of the earliest stop string in `text` (empty ones ignored), or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def streams_tokens(engine) -> bool:
    """Whether `engine` has the optional streaming methods of `RolloutEngine`."""
    return "on_step" in inspect.signature(engine.generate).parameters and hasattr(engine, "response_text")
