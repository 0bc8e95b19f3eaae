"""A rollout engine in its own Ray actor, behind the same protocol.

The driver keeps calling `generate`, `update_weights`, `sleep` and `wake_up`; each call runs in
the actor and blocks on its result, so swapping a local engine for a remote one changes one
line. The engine is built inside the actor (vLLM holds a GPU and its own processes; they must
live where Ray placed the actor), from an importable class and its keyword arguments.

    engine = make_remote_engine(VLLMEngine, num_gpus=1, model_path=path, enable_lora=True)
    out = engine.generate(prompt_ids, SamplingParams(n=4, temperature=1.0))
    engine.update_weights(lora=adapter_tensors)

Ray is imported when an engine is made, never at `import rollout`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from rollout.base import RolloutOutput, SamplingParams


class RemoteEngine:
    """Blocking proxy to an engine living in a Ray actor (`actor` is the actor handle)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> RolloutOutput:
        return self._get(self.actor.generate.remote([list(map(int, p)) for p in prompts], params))

    def update_weights(
        self,
        *,
        lora: Mapping[str, torch.Tensor] | None = None,
        state_dict: Mapping[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        # CPU copies: a CUDA tensor would be pickled with its device and land on the actor's GPU 0.
        cpu = lambda d: None if d is None else {k: v.detach().cpu() for k, v in d.items()}  # noqa: E731
        self._get(self.actor.update_weights.remote(lora=cpu(lora), state_dict=cpu(state_dict), **kwargs))

    def sleep(self) -> None:
        self._get(self.actor.sleep.remote())

    def wake_up(self) -> None:
        self._get(self.actor.wake_up.remote())

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Any other method of the engine, e.g. `call("close")`."""
        return self._get(getattr(self.actor, method).remote(*args, **kwargs))

    def kill(self) -> None:
        """End the actor (and the engine with it)."""
        import ray

        ray.kill(self.actor)

    @staticmethod
    def _get(ref):
        import ray

        return ray.get(ref)


def make_remote_engine(
    engine_cls: type,
    *,
    num_gpus: float = 0,
    num_cpus: float = 1,
    env_vars: Mapping[str, str] | None = None,
    **engine_kwargs: Any,
) -> RemoteEngine:
    """Start `engine_cls(**engine_kwargs)` in a new Ray actor and return its blocking proxy.

    num_gpus / num_cpus: the actor's Ray resources (one GPU per vLLM engine without tensor
                         parallelism; Ray sets CUDA_VISIBLE_DEVICES accordingly).
    env_vars:            environment of the actor's process, set before the engine is built
                         (e.g. VLLM_ENABLE_V1_MULTIPROCESSING, VLLM_CPU_KVCACHE_SPACE).
    Ray must be initialised (`ray.init(...)`) by the caller. Construction errors surface on the
    first call, re-raised by `ray.get`; `RemoteEngine.call("ping")`-style checks are not needed.
    """
    import ray

    options: dict[str, Any] = {"num_gpus": num_gpus, "num_cpus": num_cpus}
    if env_vars:
        options["runtime_env"] = {"env_vars": dict(env_vars)}
    actor = ray.remote(engine_cls).options(**options).remote(**engine_kwargs)
    return RemoteEngine(actor)
