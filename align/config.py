"""Typed configuration: one documented dataclass per component, composed by Hydra.

The YAML files in `configs/` choose values; these dataclasses are their schemas. Hydra merges
the YAML onto the schema in struct mode, so an unknown key fails at start-up naming it; then
`to_config` turns the merged tree into frozen dataclass instances, whose `__post_init__` checks
every value with a message that names the key (`trainer.lr_scheduler: 'cosin' is not one of
...`). The instances are never mutated afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


def shared_data_dir() -> str:
    """Where the shipped models and datasets live: $ALIGN_DATA_DIR, else ../shared/data."""
    return os.environ.get("ALIGN_DATA_DIR", str((REPO_ROOT.parent / "shared" / "data").resolve()))


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _one_of(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: {value!r} is not one of {list(valid)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


# --------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class LoraConfig:
    """A peft LoRA adapter. `target_modules="all-linear"` or a list of module names."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Any = "all-linear"

    def __post_init__(self):
        _positive("lora.r", self.r)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to load and how to fine-tune it.

    name_or_path: a local Hugging Face folder or a hub id.
    finetune: `lora` (a peft adapter; the base stays frozen) or `full`.
    quantization: null, or `nf4` (QLoRA: 4-bit base through bitsandbytes).
    """

    name_or_path: str = "stories260K"
    tokenizer: Optional[str] = None
    dtype: str = "float32"  # storage of the weights; trainable ones are fp32 masters under trainer.precision=bf16-mixed
    device: str = "cpu"
    trust_remote_code: bool = False
    finetune: str = "full"
    quantization: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
        _one_of("model.finetune", self.finetune, ("full", "lora"))
        _one_of("model.quantization", self.quantization, (None, "nf4", "int8"))


# ---------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataConfig:
    """A dataset: where it is, how its rows read, how they are cut to length.

    source: a .jsonl / .jsonl.gz / .json / .parquet file, a `save_to_disk` folder, or a hub name.
    format: alpaca | chat | sharegpt | pairwise | hh | kto | prompt_answer | prompt (RL prompts).
    columns: renames, e.g. {prompt: question}.
    on_error: `raise` (the error names file, line and field) or `skip` (skipped and counted).
    overlong: `truncate_left` (keep the end of the prompt) or `drop`; both are counted.
    """

    source: str = ""
    format: str = "hh"
    columns: Dict[str, str] = field(default_factory=dict)
    split: Optional[str] = None
    limit: Optional[int] = None
    val_fraction: float = 0.05
    val_size: Optional[int] = None
    max_length: int = 512
    max_prompt_length: int = 384
    max_response_length: int = 128
    overlong: str = "truncate_left"
    on_error: str = "raise"
    seed: int = 0

    def __post_init__(self):
        if not self.source:
            raise ConfigError("data.source: required (a file, a saved dataset folder or a hub name)")
        _one_of("data.format", self.format, ("alpaca", "chat", "sharegpt", "pairwise", "hh", "kto", "prompt_answer", "prompt"))
        _one_of("data.overlong", self.overlong, ("truncate_left", "drop"))
        _one_of("data.on_error", self.on_error, ("raise", "skip"))
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction!r}")
        _positive("data.max_length", self.max_length)
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be < data.max_length ({self.max_length})"
            )


# ------------------------------------------------------------------------------------- trainer


@dataclass(frozen=True)
class TrainerConfig:
    """Optimisation and run control shared by every trainer.

    batch_size is the micro-batch; one optimizer step sees batch_size * grad_accum examples.
    resume: `auto` (continue from the newest checkpoint in output_dir if any), `never`, or a path.
    precision: `fp32`, or `bf16-mixed` (bf16 compute, by autocast under `single` and by FSDP2's
        mixed-precision policy under ddp and fsdp2, over fp32 master weights and fp32 optimizer
        state; align/engine). `model.dtype` is the weights' storage.
    optimizer: `adamw` (decay on >= 2-D weights only), or `sgd` (plain SGD at `lr`: a step is lr x
        the gradient, which tests that compare gradients through the weights rely on; Adam's
        first step is nearly lr x sign(g), blind to the gradient's scale).
    loggers: where metrics go besides metrics.jsonl (always written): any of `tensorboard`, `wandb`,
        `mlflow`, `trackio` (align/trainers/trackers.py; each but TensorBoard an optional extra).
        A resumed run continues the same tracker run (ids kept in `<output_dir>/tracking.json`).
    run_name, project, group, tags: the tracker run's name (null: the output directory's name),
        project (W&B project, MLflow experiment, trackio project), group (W&B group; the pipeline
        groups its stages under its own name) and tags.
    strategy: how `cluster.num_replicas` replicas share the work (align/engine): `single` (one
        process holds everything: the CPU default, one replica), `ddp` (every replica holds the whole
        model; FSDP2's backward hooks sum the gradients over the replicas) or `fsdp2` (parameters,
        gradients and optimizer state sharded over the replicas with PyTorch FSDP2). Batch sizes are global: N replicas train on
        the same examples per step as one.
    fsdp_shard_size: fsdp2 only: shard over groups of this many replicas (e.g. the GPUs of a node),
        the groups replicating (hybrid sharding, HSDP, over a 2-D mesh); null: over all replicas.
    gradient_checkpointing: keep only each decoder layer's input for the backward pass and run the
        layer's forward again there (align/models/checkpointing.py; KV-cached shared-prompt passes
        included): activations fall to about one hidden state per token and layer, for one more
        forward pass of compute (README "Scaling up" has measured figures).
    check_memory: at start-up, plan the run's memory (align/plan.py, `python -m align plan`) and
    `warn` when it will not fit this machine, refuse to start (`strict`), or skip the check (`off`).
    max_tokens_per_micro: null (default) keeps row-count micro-batches (`batch_size` rows, padded).
        A number switches every trainer to padding-free packing with token-budget micro-batches:
        the optimizer step's examples (`batch_size * grad_accum`; an RL minibatch) are cut into
        micro-batches of at most this many real tokens each (align/data/packing.py
        `token_budget_micro_batches`), and each micro-batch runs its sequences packed into rows
        with restarting position ids, no padding computed. Losses keep the whole step's
        normaliser, so results equal the padded path's up to float rounding. Must be at least the
        longest single sequence (a DPO/RM pair or KTO example counts as its two sequences; an RL
        row as prompt + response), checked when the batch is cut. `batch_size` then only sets how
        many examples a step draws (with grad_accum); RL no-grad passes take the same budget.
    """

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    lr_scheduler: str = "cosine"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    eval_every: int = 25
    eval_batches: int = 8
    save_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    resume: str = "auto"
    num_threads: int = 0
    progress: bool = True
    precision: str = "fp32"
    strategy: str = "single"
    fsdp_shard_size: Optional[int] = None
    optimizer: str = "adamw"
    loggers: Tuple[str, ...] = ("jsonl", "tensorboard")
    run_name: Optional[str] = None
    project: str = "align"
    group: Optional[str] = None
    tags: Tuple[str, ...] = ()
    check_memory: str = "warn"
    gradient_checkpointing: bool = False
    max_tokens_per_micro: Optional[int] = None

    def __post_init__(self):
        from align.engine import PRECISIONS, STRATEGIES
        from align.trainers.trackers import check_loggers

        _one_of("trainer.precision", self.precision, PRECISIONS)
        _one_of("trainer.strategy", self.strategy, STRATEGIES)
        _one_of("trainer.optimizer", self.optimizer, ("adamw", "sgd"))
        check_loggers(self.loggers)
        _positive("trainer.max_steps", self.max_steps)
        _positive("trainer.batch_size", self.batch_size)
        _positive("trainer.grad_accum", self.grad_accum)
        _positive("trainer.lr", self.lr)
        _positive("trainer.warmup_steps", self.warmup_steps, allow_zero=True)
        _one_of("trainer.lr_scheduler", self.lr_scheduler, ("cosine", "linear", "constant"))
        _one_of("trainer.check_memory", self.check_memory, ("warn", "strict", "off"))
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError(f"trainer.gradient_checkpointing: expected true or false, got {self.gradient_checkpointing!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"trainer.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        _positive("trainer.max_grad_norm", self.max_grad_norm, allow_zero=True)
        _positive("trainer.eval_every", self.eval_every)
        _positive("trainer.save_every", self.save_every)
        _positive("trainer.keep_checkpoints", self.keep_checkpoints)
        _positive("trainer.num_threads", self.num_threads, allow_zero=True)
        if self.max_tokens_per_micro is not None:
            _positive("trainer.max_tokens_per_micro", self.max_tokens_per_micro)
        if len(self.betas) != 2:
            raise ConfigError(f"trainer.betas: expected two numbers, got {list(self.betas)!r}")


# ---------------------------------------------------------------------- rollout, reward, cluster


@dataclass(frozen=True)
class RolloutConfig:
    """The generation engine: `hf` (CPU default) or `vllm` (GPU).

    merged_copy: RL workers with a LoRA actor generate from a plain copy of the base with the
    actor's adapter merged in, refreshed at every weight sync (one more copy of the base weights,
    as a vLLM engine holds; generation about 1.7x faster on CPU). false: generate through the
    adapter on the one shared base (least memory). With full fine-tuning it matters under ddp
    or fsdp2 replicas only: the actor's worker generates from a whole copy of the actor,
    refreshed from the gathered weights at every sync (false is refused there: the HF engine
    would gather the FSDP2 units for every token); one replica's engine runs on the actor itself.
    fast_decode: the HF engine decodes Llama, Mistral and Qwen2 models with its lean decode step
    (`rollout.fast_decode`: same logits, about 1.5x faster generation on CPU); false runs the
    model's own forward for every token. Other models and LoRA layers always use the forward.
    mode: `sync` (generate, score, train, sync weights, one after the other) or `async` (RL only,
    with `cluster.placement=split`): a dedicated rollout group (`cluster.num_rollout_replicas`
    workers, each an engine over the actor) generates the next batches while the trainer updates
    on the current one, and takes each update's weights in its queue of calls
    (align/trainers/rl.py `RLRun.rollout`). max_staleness: with `async`, how many policy versions
    a trained sample may lag the policy it is trained on; that many batches beyond the current one
    are in flight, and older samples are dropped and counted (0: generation waits for every
    update, the sync loop on the rollout group). partial_rollouts: with `async` and the HF engine,
    a weight update that arrives while a batch is being generated is loaded between two decode
    steps, and the rest of the batch is generated under the new weights (the KV cache of the
    tokens before stays as it was computed); each token records its version
    (`Experience.token_versions`) and a row counts as old as its first token. producer_reference:
    with `async`, each rollout worker also computes the reference log-probs of the batch it has
    just generated (the reference never changes, so they need no policy version), which takes that
    forward pass off the trainer's step, as OpenRLHF's asynchronous experience maker does; false
    leaves it to the trainer, which is better when generation alone already bounds the step.
    """

    backend: str = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 64
    n: int = 1
    stop: Tuple[str, ...] = ()
    gpu_memory_utilization: float = 0.5
    sleep_when_training: bool = True
    merged_copy: bool = True
    fast_decode: bool = True
    mode: str = "sync"
    max_staleness: int = 1
    partial_rollouts: bool = False
    producer_reference: bool = True

    def __post_init__(self):
        _one_of("rollout.backend", self.backend, ("hf", "vllm"))
        _one_of("rollout.mode", self.mode, ("sync", "async"))
        _positive("rollout.max_staleness", self.max_staleness, allow_zero=True)
        if self.partial_rollouts and (self.mode != "async" or self.backend != "hf"):
            raise ConfigError(f"rollout.partial_rollouts: weights loaded between decode steps need rollout.mode=async "
                              f"and rollout.backend=hf, got mode={self.mode}, backend={self.backend}")
        _positive("rollout.temperature", self.temperature, allow_zero=True)
        _positive("rollout.max_new_tokens", self.max_new_tokens)


@dataclass(frozen=True)
class RewardConfig:
    """A registered reward (`rewards.get_reward(name, **options)`), or a trained reward model.

    RL sequence score = rule score (when `name` is set) + model_weight * reward-model score (when
    `model_path` is set). model_path: a folder written by `save_role("reward", ...)` (the RM job's
    output: an adapter or weights + score head for the policy's own base, served as the shared
    model's reward role), or a Hugging Face sequence classifier with one output, folder or hub id,
    of any size, architecture and tokenizer (`align.models.scorer`: it reads the prompt and response
    as text, through its own chat template; in split placement its workers load nothing else).
    name may be your own code, no registration needed: `path/to/file.py:fn` or `package.module:fn`
    (a class is built with `options`; rewards/loading.py). A relative file is found in the cwd or
    on sys.path, so a file in a Ray job's working directory loads on the driver and the workers.
    """

    name: Optional[str] = "story"
    options: Dict[str, Any] = field(default_factory=dict)
    model_path: Optional[str] = None
    model_weight: float = 1.0


@dataclass(frozen=True)
class EnvConfig:
    """Multi-turn episodes with an environment (rewards/envs, rollout/multiturn.py); `none`: the
    single-turn rollout, unchanged.

    name: a registered environment (calculator, python_sandbox, guess_number, tools, remote) or
        your own `path/to/file.py:Class` / `package.module:Class`; null: single-turn.
    options: keyword arguments of the environment (e.g. {low: 1, high: 10}; tools: {tools:
        [calculator, my_tools.py:fn], parser: hermes}; remote: {url: http://127.0.0.1:8001}).
    max_turns: model turns per episode at most.
    max_total_tokens: the response side's budget (model and environment tokens) per episode;
        each turn generates at most rollout.max_new_tokens of it.
    With an environment the sequence score is the episode's summed environment reward (plus the
    reward model's, with reward.model_path); reward.name is not used. GRPO and PPO (whose GAE
    skips the environment's tokens).
    """

    name: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)
    max_turns: int = 4
    max_total_tokens: int = 256

    def __post_init__(self):
        _positive("env.max_turns", self.max_turns)
        _positive("env.max_total_tokens", self.max_total_tokens)
        if self.name and ":" not in self.name:
            from rewards.envs import ENVS

            if self.name not in ENVS:
                raise ConfigError(f"env.name: unknown environment {self.name!r}; valid: {sorted(ENVS)}, or your own "
                                  "as 'path/to/file.py:Class' or 'package.module:Class'")


@dataclass(frozen=True)
class ClusterConfig:
    """Where workers run. `address: local` starts Ray in-process; otherwise a cluster address.

    num_rollout_replicas: with `rollout.mode=async`, the workers of the dedicated rollout group
    (each holds the actor for generation only and takes every weight update; the batch's prompts
    are split across them).
    """

    address: str = "local"
    placement: str = "colocated"
    num_replicas: int = 1
    num_cpus_per_worker: float = 1.0
    # null: 1 GPU per worker when model.device is cuda (or auto and the Ray cluster has GPUs), else 0
    num_gpus_per_worker: Optional[float] = None
    # RL runs (align/workers): CPUs of the in-process cluster (null: all), the dashboard (off:
    # nothing listens beyond Ray's own ports), seconds to wait for workers to start.
    num_cpus: Optional[int] = None
    include_dashboard: bool = False
    worker_start_timeout_s: float = 300.0
    num_rollout_replicas: int = 1

    def __post_init__(self):
        _one_of("cluster.placement", self.placement, ("colocated", "split"))
        _positive("cluster.num_replicas", self.num_replicas)
        _positive("cluster.num_rollout_replicas", self.num_rollout_replicas)
        if self.num_gpus_per_worker is not None:
            _positive("cluster.num_gpus_per_worker", self.num_gpus_per_worker, allow_zero=True)


# ---------------------------------------------------------------------------------- algorithms


@dataclass(frozen=True)
class AlgoConfig:
    """Common to every algorithm: which trainer runs (`name`)."""

    name: str = "sft"


@dataclass(frozen=True)
class SFTConfig(AlgoConfig):
    """Supervised fine-tuning: next-token loss on response tokens only.

    loss_agg: `token-mean` (every response token of the optimizer step weighs the same, across
    micro-batches) or `seq-mean-token-mean`.
    """

    name: str = "sft"
    loss_agg: str = "token-mean"

    def __post_init__(self):
        _one_of("algo.loss_agg", self.loss_agg, ("token-mean", "seq-mean-token-mean"))


@dataclass(frozen=True)
class DPOConfig(AlgoConfig):
    """Offline preference optimisation (`align/trainers/dpo.py`): one trainer, the loss by name.

    loss: a name in `align.core.PREFERENCE_LOSSES`: sigmoid (DPO), robust (rDPO), ipo, hinge,
        simpo, orpo (reference-free), kto (unpaired). docs/paper_index.md cites each.
    beta: the loss's temperature (DPO beta, IPO tau, SimPO beta, ORPO lambda, KTO beta).
    label_smoothing: cDPO / rDPO flip rate eps (sigmoid, robust only).
    simpo_gamma: SimPO's target reward margin.
    desirable_weight, undesirable_weight: KTO's lambda_D and lambda_U.
    unpair: KTO on paired data: each pair becomes one desirable (chosen) and one undesirable
        (rejected) example. Without it, `loss=kto` needs `data.format=kto`.
    precompute_reference: reference log-probs computed once before training, for the training
        items the run's `max_steps` visits and the held-out items (adapters off with LoRA, the
        initial weights with full fine-tuning), instead of a reference forward per step.
    reference_cache: keep precomputed reference log-probs on disk, keyed by data, model and
        tokenisation, and reuse them in later runs.
    reference_cache_dir: where; empty = $ALIGN_CACHE_DIR/reference or ~/.cache/align/reference.
    reference_batch_size: items per no-grad forward, for the reference precompute and the held-out
        evaluation alike (the same chunks, so at step 0 policy and reference agree exactly).
    share_prompt: run each pair's prompt once and both responses over its cached keys and
        values (the same numbers as prompt + response rows, less work); false: one forward over
        the 2B concatenated rows, for models whose forward cannot continue from a cache.
    length_normalize: pass per-token (length-normalised) log-probs, policy and reference, to
        sigmoid, robust, ipo or hinge (IPO as its authors and TRL run it); SimPO and ORPO
        normalise by themselves, KTO's reference point is on summed log-probs.
    """

    name: str = "dpo"
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    unpair: bool = False
    precompute_reference: bool = True
    reference_cache: bool = True
    reference_cache_dir: str = ""
    reference_batch_size: int = 32
    share_prompt: bool = True
    length_normalize: bool = False

    def __post_init__(self):
        from align.core.preference import PREFERENCE_LOSSES  # torch, only when a DPO run is configured

        _one_of("algo.loss", self.loss, tuple(PREFERENCE_LOSSES.names()))
        _positive("algo.beta", self.beta)
        _positive("algo.desirable_weight", self.desirable_weight)
        _positive("algo.undesirable_weight", self.undesirable_weight)
        _positive("algo.reference_batch_size", self.reference_batch_size)
        if self.label_smoothing and self.loss not in ("sigmoid", "robust"):
            raise ConfigError(f"algo.label_smoothing: only the sigmoid and robust losses use it, not {self.loss!r}")
        # cDPO allows eps = 0.5 (a coin flip); rDPO divides by 1 - 2 eps.
        if not 0 <= self.label_smoothing <= 0.5 or (self.loss == "robust" and self.label_smoothing == 0.5):
            raise ConfigError(f"algo.label_smoothing: must be in [0, 0.5] (robust: [0, 0.5)), got {self.label_smoothing!r}")
        if self.unpair and self.loss != "kto":
            raise ConfigError(f"algo.unpair: only the kto loss takes unpaired data, not {self.loss!r}")
        if self.length_normalize and self.loss not in ("sigmoid", "robust", "ipo", "hinge"):
            raise ConfigError(f"algo.length_normalize: for sigmoid, robust, ipo and hinge; {self.loss!r} "
                              "normalises by itself or works on summed log-probs")


ALGO_SCHEMAS: dict[str, type] = {"sft": SFTConfig}
ALGO_SCHEMAS["dpo"] = DPOConfig


@dataclass(frozen=True)
class RLConfig(AlgoConfig):
    """Settings every online RL driver (GRPO, PPO) shares; see align/trainers/rl.py.

    rollout_batch_size: prompts per iteration; each gets `num_generations` samples.
    num_generations: samples per prompt (GRPO's group size G); `rollout.n` is not used by RL runs.
    ppo_epochs: passes over the iteration's samples; minibatch_size: samples per optimizer step
        (null: all of them, one step per epoch). Each worker runs its share of a minibatch in
        micro-batches of `trainer.batch_size` rows (gradient accumulation).
    clip_eps_low / clip_eps_high: PPO clip range; high > low is DAPO's clip-higher (null: = low).
    dual_clip: dual-clip PPO constant c > 1, or null.
    loss_agg: a mode of `align.core.AGG_MODES`; the normaliser is global over the minibatch.
    kl_coef, kl_kind: the KL term's weight and estimator (GRPO: in the loss; PPO: reward shaping).
    entropy_coef: weight of an entropy bonus in the policy loss (loss -= coef * the policy's
        entropy over response tokens, aggregated like the loss; 0: none, nothing computed).
    policy_loss: a name in `align.core.POLICY_LOSSES`: `ppo` (the clipped surrogate), `gspo`
        (sequence-level ratio, arXiv:2507.18071), `cispo` (clipped stop-gradient IS weight,
        arXiv:2506.13585); `algo=gspo` / `algo=cispo` select them with their papers' settings.
    rollout_correction: importance weights between the rollout engine's log-probs and the
        trainer's (`align.core.rollout_correction`): `none`, `tis` (truncated at the cap) or
        `mis` (tokens or sequences above the cap leave the gradient); rollout_correction_level:
        `token` or `sequence`; rollout_correction_cap: the cap C. The sampler/trainer mismatch
        (actor/mismatch_*) is logged whatever the mode.
    eval_prompts: held-out prompts evaluated at step 0 and every `trainer.eval_every` steps, with
        `eval_samples` samples each at `eval_temperature` and a fixed seed (eval/reward).
    eval_k: also log eval/pass@k (Chen et al. 2021 Eq. 1, a sample correct when its reward >=
        `eval_threshold`), eval/mean@n and, with a math reward, eval/maj@k for each k <=
        eval_samples, from the same samples (no extra generation); [] (default): off.
    forward_batch_size: rows per no-grad forward in the workers.
    """

    rollout_batch_size: int = 8
    num_generations: int = 8
    ppo_epochs: int = 1
    minibatch_size: Optional[int] = None
    clip_eps_low: float = 0.2
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    loss_agg: str = "token-mean"
    kl_coef: float = 0.0
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    policy_loss: str = "ppo"
    rollout_correction: str = "tis"
    rollout_correction_level: str = "token"
    rollout_correction_cap: float = 2.0
    eval_prompts: int = 32
    eval_samples: int = 2
    eval_temperature: float = 1.0
    eval_k: List[int] = field(default_factory=list)
    eval_threshold: float = 1.0
    forward_batch_size: int = 64

    def __post_init__(self):
        from align.core.kl import KL_KINDS
        from align.core.masked import AGG_MODES

        for key in ("rollout_batch_size", "num_generations", "ppo_epochs", "eval_samples", "forward_batch_size"):
            _positive(f"algo.{key}", getattr(self, key))
        _positive("algo.eval_prompts", self.eval_prompts, allow_zero=True)
        _positive("algo.clip_eps_low", self.clip_eps_low)
        if self.clip_eps_high is not None:
            _positive("algo.clip_eps_high", self.clip_eps_high)
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"algo.dual_clip: must be > 1 or null, got {self.dual_clip!r}")
        if self.minibatch_size is not None:
            _positive("algo.minibatch_size", self.minibatch_size)
            if (self.rollout_batch_size * self.num_generations) % self.minibatch_size:
                raise ConfigError(
                    f"algo.minibatch_size: {self.minibatch_size} does not divide the "
                    f"{self.rollout_batch_size * self.num_generations} samples of an iteration"
                )
        _one_of("algo.loss_agg", self.loss_agg, AGG_MODES)
        _one_of("algo.kl_kind", self.kl_kind, KL_KINDS)
        _positive("algo.kl_coef", self.kl_coef, allow_zero=True)
        _positive("algo.entropy_coef", self.entropy_coef, allow_zero=True)
        _positive("algo.eval_temperature", self.eval_temperature, allow_zero=True)
        if any(not isinstance(k, int) or not 1 <= k <= self.eval_samples for k in self.eval_k):
            raise ConfigError(f"algo.eval_k: every k must be in [1, algo.eval_samples={self.eval_samples}], "
                              f"got {list(self.eval_k)}")
        from align.core.offpolicy import CORRECTION_LEVELS, ROLLOUT_CORRECTIONS
        from align.core.ppo import POLICY_LOSSES

        _one_of("algo.policy_loss", self.policy_loss, tuple(POLICY_LOSSES.names()))
        _one_of("algo.rollout_correction", self.rollout_correction, ROLLOUT_CORRECTIONS)
        _one_of("algo.rollout_correction_level", self.rollout_correction_level, CORRECTION_LEVELS)
        _positive("algo.rollout_correction_cap", self.rollout_correction_cap)
        if self.dual_clip is not None and self.policy_loss != "ppo":
            raise ConfigError(f"algo.dual_clip: a PPO-clip option; policy_loss={self.policy_loss!r} has no use for it")
        if self.policy_loss == "cispo" and self.clip_eps_low > 1:
            raise ConfigError(f"algo.clip_eps_low: CISPO's weight is clipped to [1 - clip_eps_low, ...] and must stay "
                              f">= 0, so clip_eps_low <= 1; got {self.clip_eps_low!r}")


@dataclass(frozen=True)
class GRPOConfig(RLConfig):
    """GRPO (arXiv:2402.03300) and its variants (align/trainers/grpo.py).

    advantage_estimator: a name in `align.core.ADVANTAGE_ESTIMATORS` (grpo, dr_grpo, rloo,
        reinforce_pp). kl_coef: beta of the k3 KL-in-loss term against the reference (0: no
        reference pass at all). filter_zero_variance: drop groups whose rewards are all equal
        from the update (DAPO's dynamic sampling, arXiv:2503.14476 Sec. 3.2, without re-sampling).
    """

    name: str = "grpo"
    advantage_estimator: str = "grpo"
    kl_coef: float = 0.04
    filter_zero_variance: bool = False

    def __post_init__(self):
        super().__post_init__()
        from align.core.advantages import ADVANTAGE_ESTIMATORS

        _one_of("algo.advantage_estimator", self.advantage_estimator, tuple(ADVANTAGE_ESTIMATORS.names()))
        if self.advantage_estimator == "dr_grpo" and self.loss_agg != "seq-mean-token-sum-norm":
            raise ConfigError(
                f"algo.advantage_estimator=dr_grpo with algo.loss_agg={self.loss_agg!r} is half of Dr. GRPO "
                "(arXiv:2503.20783 removes the std normalisation AND the 1/|o_i| length normalisation): use "
                "algo=dr_grpo, or set algo.loss_agg=seq-mean-token-sum-norm"
            )
        if self.num_generations < 2 and self.advantage_estimator != "reinforce_pp":
            raise ConfigError(f"algo.num_generations: group baselines need >= 2 samples per prompt, got {self.num_generations}")


@dataclass(frozen=True)
class PPOConfig(RLConfig):
    """PPO with a critic (align/trainers/ppo.py): KL-shaped token rewards, GAE, clipped losses.

    kl_controller: `fixed` (kl_coef throughout) or `adaptive` (Ziegler et al. 2019,
        arXiv:1909.08593 Sec. 2.2: kl_coef follows kl_target over kl_horizon samples).
    gamma, lam: GAE discount and lambda. whiten_advantages: whiten over the batch.
    value_clip: clip range of the value loss (null: unclipped). vf_coef: value-loss weight.
    critic_lr: the critic's learning rate (null: trainer.lr).
    critic_init_from_reward: start the critic's adapter and value head from the reward model
        (`reward.model_path`) instead of from scratch.
    """

    name: str = "ppo"
    num_generations: int = 4
    ppo_epochs: int = 2
    kl_coef: float = 0.05
    kl_kind: str = "k1"
    kl_controller: str = "fixed"
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    value_clip: Optional[float] = 0.2
    vf_coef: float = 1.0
    critic_lr: Optional[float] = None
    critic_init_from_reward: bool = False

    def __post_init__(self):
        super().__post_init__()
        _one_of("algo.kl_controller", self.kl_controller, ("fixed", "adaptive"))
        _positive("algo.kl_target", self.kl_target)
        _positive("algo.kl_horizon", self.kl_horizon)
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"algo.{key}: must be in [0, 1], got {getattr(self, key)!r}")
        _positive("algo.vf_coef", self.vf_coef)
        if self.critic_lr is not None:
            _positive("algo.critic_lr", self.critic_lr)


ALGO_SCHEMAS["grpo"] = GRPOConfig
ALGO_SCHEMAS["ppo"] = PPOConfig


@dataclass(frozen=True)
class RMConfig(AlgoConfig):
    """Reward-model training (align/trainers/rm.py): Bradley-Terry loss on preference pairs.

    The model is a `reward` LoRA adapter plus a score head on the base (model.finetune=lora) or
    the whole model plus a score head (model.finetune=full).
    margin: null (plain Bradley-Terry, InstructGPT Eq. 1), a number (the same margin m for every
        pair), or the name of a data column holding each pair's margin (Llama 2 Eq. 2:
        -log sigmoid(s_w - s_l - m)).
    export: also write `reward_model/`, an `AutoModelForSequenceClassification` folder.
    length_balance: train on length-balanced pairs (as many with the chosen response the shorter
        as the longer; Singhal et al. 2023, arXiv:2310.03716), so "longer wins" teaches nothing.
    """

    name: str = "rm"
    margin: Any = None
    export: bool = True
    length_balance: bool = False

    def __post_init__(self):
        m = self.margin
        if isinstance(m, bool) or not (m is None or isinstance(m, (int, float, str))):
            raise ConfigError(f"algo.margin: expected null, a number or a column name, got {m!r}")
        if isinstance(m, str) and not m.strip():
            raise ConfigError("algo.margin: an empty column name; use null for no margin")
        if isinstance(m, (int, float)) and not float("-inf") < m < float("inf"):
            raise ConfigError(f"algo.margin: must be finite, got {m!r}")


ALGO_SCHEMAS["rm"] = RMConfig


@dataclass(frozen=True)
class QuantizeConfig(AlgoConfig):
    """Quantization stage (align/quantize.py): weight-only int8 / int4 of a merged model, with
    its size, held-out perplexity and generation speed against the unquantized model.

    input: a Hugging Face causal-LM folder or a LoRA adapter folder (merged into its base
        first); empty = `model.name_or_path`.
    method: int8 | int4 (symmetric, round-to-nearest).
    backend: compressed-tensors (packed; vLLM's native format) | torchao.
    group_size: null = one scale per output channel; else inputs per scale (must divide every
        quantized layer's input width).
    eval_source: hh | gsm8k | a .txt / .jsonl path: `eval_samples` texts, each cut to
        `max_length` tokens, for perplexity.
    speed_prompts, max_new_tokens: the greedy generation speed test.
    """

    name: str = "quantize"
    input: str = ""
    method: str = "int8"
    backend: str = "compressed-tensors"
    group_size: Optional[int] = None
    eval_source: str = "hh"
    eval_samples: int = 64
    max_length: int = 256
    speed_prompts: int = 4
    max_new_tokens: int = 32

    def __post_init__(self):
        _one_of("algo.method", self.method, ("int8", "int4"))
        _one_of("algo.backend", self.backend, ("compressed-tensors", "torchao"))
        if self.group_size is not None:
            _positive("algo.group_size", self.group_size)
        for key in ("eval_samples", "max_length", "speed_prompts", "max_new_tokens"):
            _positive(f"algo.{key}", getattr(self, key))


ALGO_SCHEMAS["quantize"] = QuantizeConfig


@dataclass(frozen=True)
class EvalConfig(AlgoConfig):
    """Evaluation (align/evaluation): a policy on prompts, or a reward model on preference pairs.

    model: what to evaluate; empty = `model.name_or_path`. A policy: a Hugging Face folder or
        hub id (a base, a run's `final/`), a LoRA adapter folder (merged into its base), or an RL
        checkpoint (`checkpoints/step_N`, the actor on `model.name_or_path`). A reward model
        (pair data): an RM job's `reward_model/` or `reward/`, or any HF sequence classifier.
    split: `all` rows of `data.source` (up to `data.limit`), or the `val` / `train` side of the
        same deterministic split the trainers make (`data.val_size` / `val_fraction`, `data.seed`).
    n: samples per prompt at `temperature` (seeded by `seed`); greedy: one greedy response too.
    k: pass@k (Chen et al. 2021 Eq. 1) and maj@k (majority vote over extracted answers; a math
        reward only) for each k <= n.
    threshold: a sample is correct when its reward is >= threshold.
    batch_size: prompts (or pairs) per batch. length_buckets: RM accuracy by response length.
    """

    name: str = "eval"
    model: str = ""
    split: str = "all"
    n: int = 4
    k: List[int] = field(default_factory=lambda: [1, 4])
    temperature: float = 1.0
    greedy: bool = True
    threshold: float = 1.0
    batch_size: int = 32
    length_buckets: int = 4

    def __post_init__(self):
        _one_of("algo.split", self.split, ("all", "val", "train"))
        for key in ("n", "batch_size", "length_buckets"):
            _positive(f"algo.{key}", getattr(self, key))
        _positive("algo.temperature", self.temperature, allow_zero=True)
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(f"algo.temperature=0 is greedy: its {self.n} samples per prompt would be identical; "
                              "set algo.n=1 or a temperature > 0")
        bad = [k for k in self.k if not isinstance(k, int) or not 1 <= k <= self.n]
        if bad:
            raise ConfigError(f"algo.k: every k must be in [1, algo.n={self.n}], got {list(self.k)}")


ALGO_SCHEMAS["eval"] = EvalConfig


# ------------------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class RunConfig:
    """One run: the component configs, a seed and one output directory for everything."""

    algo: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: Optional[DataConfig] = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    seed: int = 0
    output_dir: str = "runs/default"

    def __post_init__(self):
        name = getattr(self.algo, "name", "sft")
        n, strategy = self.cluster.num_replicas, self.trainer.strategy
        if n > 1 and name not in REPLICATED_ALGOS:
            raise ConfigError(
                f"cluster.num_replicas: algo={name} runs in one process, so {n} replicas would be ignored; "
                f"data-parallel replicas are for {list(REPLICATED_ALGOS)}. Set cluster.num_replicas=1"
                + (" and give each stage its replicas in algo.overrides" if name == "pipeline" else "")
            )
        shard = self.trainer.fsdp_shard_size
        if shard is not None and (strategy != "fsdp2" or shard < 1 or n % shard):
            raise ConfigError(f"trainer.fsdp_shard_size={shard}: needs trainer.strategy=fsdp2 and must divide "
                              f"cluster.num_replicas={n}")
        if n > 1 and strategy == "single":
            raise ConfigError(f"trainer.strategy=single holds one replica, but cluster.num_replicas={n}: "
                              "set trainer.strategy=ddp (whole model per replica) or fsdp2 (sharded)")
        if (strategy == "fsdp2" and name == "dpo" and not getattr(self.algo, "precompute_reference", True)
                and self.model.finetune == "full"):
            raise ConfigError("algo.precompute_reference=false with model.finetune=full keeps a frozen copy of the "
                              "policy as the reference, which trainer.strategy=fsdp2 does not shard: precompute the "
                              "reference (algo.precompute_reference=true, the default) or use LoRA")
        if strategy != "single" and n > 1 and isinstance(self.algo, RLConfig) and self.rollout.backend == "hf" and (
                not self.rollout.merged_copy or self.model.quantization is not None):
            # ddp and fsdp2 run the model as FSDP2 units (DTensor parameters gathered only inside the
            # engine's forward): the HF engine generates from a whole copy of the actor (LoRA merged in,
            # or the fully fine-tuned weights), refreshed from the gathered weights at every sync.
            why = ("rollout.merged_copy=false" if not self.rollout.merged_copy else
                   f"model.quantization={self.model.quantization} (no merged copy of a quantized base)")
            raise ConfigError(f"trainer.strategy={strategy} runs the RL workers' model as FSDP2 units, and with {why} "
                              "the HF rollout engine would generate through them token by token: set "
                              "rollout.merged_copy=true (a whole copy of the actor generates, refreshed from the "
                              "gathered weights at each sync; the default) on an unquantized model, or rollout=vllm")
        if n > 1 and name in ("sft", "rm", "dpo") and self.trainer.batch_size % n:
            raise ConfigError(f"trainer.batch_size={self.trainer.batch_size} must be a multiple of "
                              f"cluster.num_replicas={n}: each replica takes an equal share of every micro-batch")
        if isinstance(self.algo, RLConfig):
            _check_rl_sampling(self.rollout)
        if self.rollout.mode == "async":
            if name != "grpo":
                raise ConfigError(f"rollout.mode=async: asynchronous rollouts are implemented for algo=grpo, got "
                                  f"algo={name}; use rollout.mode=sync")
            if self.cluster.placement != "split":
                raise ConfigError(f"rollout.mode=async needs the rollout engine on workers of its own: set "
                                  f"cluster.placement=split (a dedicated rollout group of "
                                  f"cluster.num_rollout_replicas workers), got cluster.placement="
                                  f"{self.cluster.placement}")
            if self.rollout.partial_rollouts and self.env.name:
                raise ConfigError("rollout.partial_rollouts: multi-turn episodes (env.name) are generated whole; "
                                  "set rollout.partial_rollouts=false")
        if self.env.name and name not in ("grpo", "ppo"):
            raise ConfigError(f"env.name={self.env.name}: multi-turn environments are for the RL stages (algo=grpo, "
                              f"algo=ppo), got algo={name}")
        m = self.model
        if m.finetune == "full" and m.dtype in HALF_DTYPES and self.trainer.precision == "fp32":
            raise ConfigError(
                f"model.dtype={m.dtype} with model.finetune=full and trainer.precision=fp32 would step AdamW on "
                f"{m.dtype} weights (updates smaller than its resolution vanish): set trainer.precision=bf16-mixed "
                "(fp32 master weights and optimizer state, bf16 compute), or model.dtype=float32"
            )


HALF_DTYPES = ("bfloat16", "bf16", "float16", "fp16")


# Stages that run as `cluster.num_replicas` data-parallel replicas: RL worker groups
# (align/workers/group.py), SFT/RM/DPO/KTO as N copies of their driver (align/engine/spmd.py).
REPLICATED_ALGOS = ("grpo", "ppo", "sft", "rm", "dpo")


def _check_rl_sampling(r: RolloutConfig) -> None:
    """RL log-probs (old, reference, training, entropy) are those of softmax(logits /
    temperature) over the whole vocabulary: the distribution the engine samples from when top-p
    and top-k are off. With them on, the sampler's distribution is renormalised over a subset the
    trainer does not see, so they are refused rather than silently mismatched."""
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature: RL samples at a temperature > 0 (0 is greedy: every sample of a "
                          f"prompt would be the same), got {r.temperature!r}")
    if r.top_p < 1.0 or r.top_k > 0:
        raise ConfigError(f"rollout.top_p={r.top_p!r}, rollout.top_k={r.top_k!r}: RL trainers compute log-probs at "
                          "rollout.temperature over the whole vocabulary, so a truncated sampler would be off-policy "
                          "for them; set rollout.top_p=1.0 and rollout.top_k=-1 (tune rollout.temperature instead)")


def _schema_node(schema):
    """A structured node for the ConfigStore. Frozen dataclasses make read-only nodes, which
    would refuse command-line overrides, so the node is made writable; the frozen instances
    come later, from `to_config`."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(schema)
    _unlock(node)
    return node


def _unlock(node) -> None:
    """Clear the read-only flag a frozen dataclass puts on its node and every child node."""
    from omegaconf import Container

    node._set_flag("readonly", None)
    if isinstance(node, Container) and not node._is_none() and not node._is_missing():
        keys = range(len(node)) if isinstance(node, list) or hasattr(node, "insert") else list(node.keys())
        for key in keys:
            _unlock(node._get_node(key))


def register_schemas() -> None:
    """Put the schemas into Hydra's ConfigStore; configs/*.yaml extend them by name."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=_HydraRun)
    for name, schema in ALGO_SCHEMAS.items():
        cs.store(group="algo", name=f"{name}_schema", node=_schema_node(schema))
    for group, schema in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("trainer", TrainerConfig),
        ("rollout", RolloutConfig),
        ("reward", RewardConfig),
        ("cluster", ClusterConfig),
        ("env", EnvConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=_schema_node(schema))


@dataclass
class _HydraRun:
    """The top-level node Hydra validates against: components are filled by the groups."""

    algo: Any = None
    model: Any = None
    data: Any = None
    trainer: Any = None
    rollout: Any = None
    reward: Any = None
    cluster: Any = None
    env: Any = None
    seed: int = 0
    output_dir: str = "runs/default"


def register_resolvers() -> None:
    """`${shared_data:}` in the YAML files resolves to `shared_data_dir()`."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("shared_data"):
        OmegaConf.register_new_resolver("shared_data", shared_data_dir)
    if not OmegaConf.has_resolver("config_dir"):  # files shipped next to the YAML (story prompts)
        OmegaConf.register_new_resolver("config_dir", lambda: str(CONFIG_DIR))


def compose(overrides: list[str] | tuple[str, ...] = ()) -> tuple[RunConfig, Any]:
    """Build a run's config in-process, exactly as `python -m align <overrides>` would.

    Returns the frozen RunConfig and Hydra's DictConfig (for writing the resolved YAML).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_config(cfg), cfg


def to_config(cfg) -> RunConfig:
    """Turn Hydra's merged DictConfig into frozen, validated dataclasses.

    Raises ConfigError naming the key for any bad value.
    """
    from omegaconf import OmegaConf

    def build(schema, node, key):
        if node is None:
            return None
        merged = OmegaConf.merge(_schema_node(schema), node)
        try:
            return OmegaConf.to_object(merged)
        except ConfigError:
            raise
        except Exception as exc:  # omegaconf validation errors already name the key
            raise ConfigError(f"{key}: {exc}") from exc

    algo_name = cfg.algo.name if cfg.algo is not None else "sft"
    if algo_name not in ALGO_SCHEMAS:
        raise ConfigError(f"algo.name: {algo_name!r} is not one of {sorted(ALGO_SCHEMAS)}")
    return RunConfig(
        algo=build(ALGO_SCHEMAS[algo_name], cfg.algo, "algo"),
        model=build(ModelConfig, cfg.model, "model"),
        data=build(DataConfig, cfg.data, "data"),
        trainer=build(TrainerConfig, cfg.trainer, "trainer"),
        rollout=build(RolloutConfig, cfg.rollout, "rollout"),
        reward=build(RewardConfig, cfg.reward, "reward"),
        cluster=build(ClusterConfig, cfg.cluster, "cluster"),
        env=build(EnvConfig, cfg.get("env"), "env") or EnvConfig(),
        seed=cfg.seed,
        output_dir=cfg.output_dir,
    )


PIPELINE_STAGES = ("sft", "rm", "dpo", "grpo", "ppo", "quantize", "serve")


@dataclass(frozen=True)
class PipelineConfig(AlgoConfig):
    """The whole pipeline (align/pipeline.py): each stage an ordinary run in `<output_dir>/<stage>`.

    stages: in order; rm and dpo start from the SFT model, quantize takes the GRPO (or PPO)
        actor, serve answers one query from the quantized model.
    overrides: per stage, extra Hydra overrides (e.g. {grpo: [trainer.max_steps=20]}).
    serve_prompt: the query sent to the served model.
    eval_rl: evaluate (algo=eval) the policy before and after each RL stage (grpo, ppo) on the
        RL stage's held-out prompts with its reward, and print the change; `eval_overrides` are
        the evaluations' extra Hydra overrides (e.g. [algo.n=8, "algo.k=[1,4,8]"]).
    """

    name: str = "pipeline"
    stages: List[str] = field(default_factory=lambda: ["sft", "rm", "dpo", "grpo", "quantize", "serve"])
    overrides: Dict[str, List[str]] = field(default_factory=dict)
    serve_prompt: str = "Once upon a time, there was a little"
    eval_rl: bool = True
    eval_overrides: List[str] = field(default_factory=list)

    def __post_init__(self):
        for stage in self.stages:
            _one_of("algo.stages[]", stage, PIPELINE_STAGES)
        for stage in self.overrides:
            if stage not in self.stages:
                raise ConfigError(f"algo.overrides.{stage}: not one of the pipeline's stages {list(self.stages)}")


ALGO_SCHEMAS["pipeline"] = PipelineConfig
