"""Will it fit? Per-process memory and per-step time of a run, from the model's config alone.

`python -m align plan <the same overrides as a run>` composes the run's config, reads the model's
`config.json` (a folder or hub id; never its weights: the parameter count comes from the model
built on PyTorch's `meta` device) and prints, for each process the run starts, what it will hold:

- weights: every copy the code keeps (LoRA: one base plus adapters and heads, `MultiHeadModel`;
  full fine-tuning: one model per trainable role plus a frozen reference, `SeparateModels`).
- gradients and optimizer state of the trainable parameters: `torch.optim.AdamW` keeps exp_avg and
  exp_avg_sq in the parameter's dtype (`build_optimizer`), so 4 + 4 + 8 = 16 bytes per trainable
  fp32 parameter, 2 + 2 + 4 = 8 in bf16. With fp32 master weights (`trainer.precision=bf16-mixed`
  where the trainer has it) it is ZeRO's 2 + 2 + 12 = 16 (Rajbhandari et al., "ZeRO",
  arXiv:1910.02054, Sec. 3.1: 2 bytes fp16 parameters, 2 fp16 gradients, 12 for the fp32 copy,
  momentum and variance).
- activations of one training micro-batch, with and without gradient checkpointing (below), and
  the (B, T, V) logits with their gradient (`align.core.logprobs` keeps no second vocab tensor);
  the RL workers' log-probs go through the LM head in chunks (`align.core.linear_logprobs`): one
  (chunk, V) fp32 slice and its temporaries.
- the rollout engine: the HF engine's KV cache, 2 * layers * kv_heads * head_dim * bytes per
  token, for one generation chunk (`algo.forward_batch_size` rows of prompt + `max_new_tokens`);
  the merged copy of a LoRA actor (`rollout.merged_copy`: one more copy of the base), or under
  fsdp2 with full fine-tuning the actor's whole, unsharded copy the HF engine generates from
  (the same `rollout.merged_copy`; unsharded the engine runs on the actor itself); vLLM's
  share of the GPU (`rollout.gpu_memory_utilization` of it; its weights and KV cache live there).
- the runtime: on CPU the resident memory of the Python process with torch, transformers, peft and
  the trainers imported (a measured constant, `CPU_RUNTIME_BYTES`); on a GPU, the CUDA context.

A process's peak is what it always holds (runtime, weights, optimizer state, merged copy) plus the
largest of its phases: the training step (gradients + activations + logits), generation (KV cache)
and the no-grad scoring pass (logits of one `forward_batch_size` chunk). Sequence lengths are the
configured maxima (a batch padded to `data.max_length`): the plan is for the longest batch.

Activations, per token and layer of a Llama-style decoder in training (tensors autograd saves for
the backward pass, counted from the HF modelling code: RMSNorm keeps its input and output, 2h, twice
per layer; q, k, v and their rotated q, k; the attention output and its contiguous copy for o_proj;
the gated MLP's gate, up, silu(gate) and product, 4 * intermediate):
    4 h + 4 heads * head_dim + 3 kv_heads * head_dim + 4 intermediate   elements
(Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models",
arXiv:2205.05198, Sec. 4.1 counts 34 s b h bytes per GPT layer the same way; SDPA, the default
attention, keeps no (T, T) score matrix.) Gradient checkpointing (Chen et al., arXiv:1604.06174)
keeps each layer's input, h per token and layer, and recomputes one layer at a time.

Sharding (`trainer.strategy`, align/engine): `single` holds a whole replica; `ddp` replicates
everything (FSDP2 units over shards of one replica: no whole-model gradient bucket, each unit's
gradients are staged and all-reduced as its backward ends, and a unit's parameters are copied into
a compute buffer for its forward and backward, one layer at a time, as fsdp2 gathers); `fsdp2`
(FSDP / ZeRO-3) divides parameters, gradients and optimizer state by the world size and gathers one
layer's parameters at a time (PyTorch FSDP2 `fully_shard` docs; ZeRO Sec. 5.3, Pos+g+p:
(2 + 2 + K) * params / N_d; veRL's FSDP workers do the same). `trainer.check_memory` (warn | strict | off) runs this plan at start-up.

FLOPs: 6 N per trained token (Kaplan et al., arXiv:2001.08361, Sec. 2.1: 2 N forward, 4 N
backward) plus the attention term 6 * layers * context * hidden; 2 N per token of inference; LoRA
skips the frozen weights' gradients (4 N per trained token: forward and input gradients);
checkpointing adds a forward (8 N). Time per step = FLOPs / (peak FLOP/s * efficiency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from align.config import ConfigError, RunConfig

GIB, MIB = 1024**3, 1024**2
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

# Resident memory of a process before its model, measured on the CI machine (x86-64 Linux, torch 2.13
# CPU, transformers 5, peft with bitsandbytes, ray 2.60) by `python scripts/bench_plan.py --baseline`:
# trainer: a two-step stories260K SFT run's peak less its planned tensors (imports alone: 397 MiB;
# the rest is tokenizer, data, logging, thread pools); ray_worker: a Ray actor after a ModelWorker's
# imports; driver: the RL driver's peak (it holds no model). Another machine or version differs by
# tens of MiB: negligible beside any model worth planning, and restated by that script.
CPU_RUNTIME_BYTES = {"trainer": 463 * MIB, "ray_worker": 440 * MIB, "driver": 442 * MIB}
# A CUDA context with cuBLAS/cuDNN loaded: about 0.5-1 GiB per process depending on the GPU and
# CUDA version (PyTorch "CUDA semantics" notes on the caching allocator and context); the upper end.
CUDA_CONTEXT_BYTES = 1 * GIB
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (TFLOP/s, without sparsity).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0,
                   "L4": 121.0, "V100": 125.0}
# CPU: cores * 2.5 GHz * 32 fp32 FLOP per cycle (two AVX2 FMA units of 8 lanes); an assumption.
CPU_FLOPS_PER_CORE = 2.5e9 * 32


# ------------------------------------------------------------------------------------ the model


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder, read from its config.

    params: every parameter of the causal LM (embedding, layers, LM head unless tied).
    linears: (in_features, out_features, name) of each nn.Linear but the LM head: LoRA's targets.
    """

    params: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    context: int
    linears: tuple = ()

    def lora_params(self, r: int, targets: Any) -> int:
        """A LoRA adapter's parameters: r * (in + out) per adapted linear layer (Hu et al. 2021)."""
        names = None if targets == "all-linear" else {targets} if isinstance(targets, str) else set(targets)
        return sum(r * (i + o) for i, o, name in self.linears if names is None or name in names)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer: 2 * layers * kv_heads * head_dim * bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def activation_elements_per_token(self, checkpointing: bool) -> int:
        """Elements autograd keeps per token for the backward pass, all layers (module docstring)."""
        h, a, kv, d, inter = self.hidden, self.heads, self.kv_heads, self.head_dim, self.intermediate
        per_layer = 4 * h + 4 * a * d + 3 * kv * d + 4 * inter
        if checkpointing:  # each layer's input kept; one layer recomputed at a time
            return self.layers * h + per_layer + 3 * h
        return self.layers * per_layer + 3 * h  # + embedding output and the final norm


def read_model_shape(name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model at `name_or_path` (a folder or hub id): its config only, the model
    built on the meta device (no memory, no weights read) to count parameters exactly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as exc:  # a missing folder, a hub id offline, an unknown architecture
        raise ConfigError(f"model.name_or_path: cannot read the config of {name_or_path!r}: {exc}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config()
    head = model.get_output_embeddings()
    linears = tuple((m.in_features, m.out_features, n.rsplit(".", 1)[-1]) for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not head)
    heads = text.num_attention_heads
    return ModelShape(
        params=sum(p.numel() for p in model.parameters()), vocab=text.vocab_size, hidden=text.hidden_size,
        layers=text.num_hidden_layers, heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        context=getattr(text, "max_position_embeddings", 0) or 0, linears=linears,
    )


# -------------------------------------------------------------------------------- the inputs


@dataclass(frozen=True)
class Setup:
    """The run as the planner sees it: every knob a fix may turn. `from_config` reads a RunConfig,
    with today's defaults for keys this build's config may not have (strategy, checkpointing,
    precision)."""

    algo: str
    finetune: str
    lora_r: int
    lora_targets: Any
    dtype_bytes: int
    precision: str = "model"          # model: the model's dtype throughout; bf16-mixed: fp32 master weights
    strategy: str = "single"          # single | ddp | fsdp2
    world: int = 1                    # processes of one data-parallel group
    checkpointing: bool = False
    micro_batch: int = 8              # rows per backward
    grad_accum: int = 1
    max_tokens: int | None = None     # trainer.max_tokens_per_micro: packed micro-batches of at most this many tokens
    prompt_len: int = 384
    response_len: int = 128
    seq_len: int = 512
    roles: tuple = ("actor",)         # trainable roles (RL) or the one trained model
    placement: str = "colocated"
    rollout_backend: str = "hf"
    merged_copy: bool = True
    gpu_memory_utilization: float = 0.5
    sleep_when_training: bool = True
    rollout_rows: int = 0             # samples per RL iteration (prompts x generations)
    forward_batch: int = 64           # rows per no-grad forward and generation chunk
    ppo_epochs: int = 1
    reward_model: str = ""            # "" | "role" (a reward adapter on the policy's base) | "classifier"
    reference_copy: bool = False      # DPO full fine-tuning without precomputed reference log-probs
    device: str = "cpu"

    @classmethod
    def from_config(cls, cfg: RunConfig, device: str) -> Setup:
        algo, t, m, r, d = cfg.algo, cfg.trainer, cfg.model, cfg.rollout, cfg.data
        name = algo.name
        rl = name in ("grpo", "ppo")
        prompt_len = d.max_prompt_length if d is not None else 0
        response_len = r.max_new_tokens if rl else (d.max_length - prompt_len if d is not None else 0)
        reward_model = ""
        if rl and cfg.reward.model_path:
            from align.models.scorer import reward_model_kind

            reward_model = "classifier" if reward_model_kind(cfg.reward.model_path) == "classifier" else "role"
        return cls(
            algo=name, finetune=m.finetune, lora_r=m.lora.r, lora_targets=m.lora.target_modules,
            dtype_bytes=DTYPE_BYTES[m.dtype], precision=getattr(t, "precision", "model") or "model",
            strategy=getattr(t, "strategy", "single") or "single", world=cfg.cluster.num_replicas,
            checkpointing=bool(getattr(t, "gradient_checkpointing", False)), micro_batch=t.batch_size,
            grad_accum=t.grad_accum, max_tokens=getattr(t, "max_tokens_per_micro", None), prompt_len=prompt_len,
            response_len=response_len, seq_len=prompt_len + response_len,
            roles=("actor", "critic") if name == "ppo" else ("actor",) if rl else (name,),
            placement=cfg.cluster.placement, rollout_backend=r.backend, merged_copy=r.merged_copy,
            gpu_memory_utilization=r.gpu_memory_utilization, sleep_when_training=r.sleep_when_training,
            rollout_rows=algo.rollout_batch_size * algo.num_generations if rl else 0,
            forward_batch=getattr(algo, "forward_batch_size", getattr(algo, "reference_batch_size", 64)),
            ppo_epochs=getattr(algo, "ppo_epochs", 1), reward_model=reward_model,
            reference_copy=(name == "dpo" and m.finetune == "full" and not algo.precompute_reference
                            and algo.loss not in ("simpo", "orpo")),
            device=device,
        )


# ----------------------------------------------------------------------------------- the plan


@dataclass
class ProcessPlan:
    """One kind of process: `count` of them, each holding `parts` (bytes); `peak` per process."""

    name: str
    count: int
    parts: dict = field(default_factory=dict)
    peak: int = 0
    peak_phase: str = ""
    notes: list = field(default_factory=list)


@dataclass
class Plan:
    setup: Setup
    shape: ModelShape
    processes: list
    flops_per_step: float
    seconds_per_step: float
    peak_flops: float
    efficiency: float
    available_bytes: int | None = None
    available_what: str = ""
    peak_source: str = ""
    problems: list = field(default_factory=list)
    fixes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict:
        return {"setup": asdict(self.setup), "params": self.shape.params,
                "processes": [asdict(p) for p in self.processes], "flops_per_step": self.flops_per_step,
                "seconds_per_step": self.seconds_per_step, "available_bytes": self.available_bytes,
                "fits": self.fits, "problems": self.problems, "fixes": self.fixes}


def _model_process(s: Setup, shape: ModelShape, name: str, roles: tuple, *, rollout: bool, trains: bool,
                   rows_gen: int = 0) -> ProcessPlan:
    """The memory of one process hosting `roles` (and the reference, and the rollout engine when
    `rollout`); see the module docstring for every term."""
    b, n = s.dtype_bytes, shape.params
    lora = s.finetune == "lora"
    mixed = s.precision == "bf16-mixed"
    shard = s.world if s.strategy == "fsdp2" else 1
    # A reward role on the policy's base (reward.model_path a save_role folder), frozen, colocated.
    frozen = 1 if rollout and s.reward_model == "role" and s.placement == "colocated" else 0
    # Weights: LoRA keeps one base; full fine-tuning a copy per role plus the frozen reference.
    copies = 1 if lora else len(roles) + frozen + (1 if rollout or s.reference_copy else 0)
    # peft keeps adapters in fp32 even over a bf16 base (autocast_adapter_dtype); heads: hidden each.
    if lora:
        adapter = shape.lora_params(s.lora_r, s.lora_targets) + shape.hidden
        trainable, trainable_bytes, extra = adapter * len(roles), 4, adapter * frozen * 4
    else:
        trainable, trainable_bytes, extra = n * len(roles), 4 if mixed else b, 0
    if not trains:
        trainable, extra = 0, (shape.lora_params(s.lora_r, s.lora_targets) * 4 if lora else 0)
    weights = copies * n * b + extra + (trainable * 4 if lora else 0) + (trainable * 4 if mixed and not lora else 0)
    p = ProcessPlan(name=name, count=s.world)
    parts = p.parts
    parts["weights"] = weights // shard
    parts["gradients"] = trainable * trainable_bytes // shard
    parts["optimizer state"] = 2 * trainable * trainable_bytes // shard
    if s.strategy in ("ddp", "fsdp2") and s.world > 1:
        parts["weights"] += (copies * n * b) // max(shape.layers, 1)  # one layer gathered (ddp: copied)

    act_b = b  # activations are in the compute dtype
    rows = s.micro_batch * (2 if s.algo in ("dpo", "rm") else 1)  # a pair is two sequences
    tokens = rows * s.seq_len
    if s.algo == "dpo":  # share_prompt: the prompt once, both responses over its cache
        tokens = s.micro_batch * s.prompt_len + rows * s.response_len
    responses = rows * s.response_len
    if s.max_tokens:  # packed micro-batches: at most the budget's tokens however many rows
        rl_step = s.algo in ("grpo", "ppo")
        tokens = min(s.max_tokens, s.rollout_rows * s.seq_len if rl_step else tokens * s.grad_accum)
        responses = min(tokens, s.rollout_rows * s.response_len if rl_step else responses * s.grad_accum)
    per_token = shape.activation_elements_per_token
    parts["activations"] = tokens * per_token(False) * act_b if trains else 0
    parts["activations (checkpointing)"] = tokens * per_token(True) * act_b if trains else 0
    # DPO and the RL workers run the LM head on response positions only (shared-prompt log-probs).
    lm_rows = 0 if s.algo == "rm" or "actor" not in roles and s.algo in ("grpo", "ppo") else (
        tokens if s.algo == "sft" else responses)  # a critic or reward worker: no LM head
    parts["logits"] = 2 * lm_rows * shape.vocab * act_b if trains else 0  # logits and their gradient
    # The RL workers' log-probs go through the LM head in chunks (align/core/linear_logprobs.py): one
    # (chunk, V) fp32 slice and its two temporaries (softmax, gradient), not (rows, V) logits.
    chunk_rows = max(1, (1 << 24) // max(shape.vocab, 1))
    if s.algo in ("grpo", "ppo") and trains:
        parts["logits"] = 3 * min(lm_rows, chunk_rows) * shape.vocab * 4
    if s.algo == "dpo":  # the reference precompute and evaluation: forward_batch pairs, responses only
        parts["logits (no-grad pass)"] = 2 * s.forward_batch * s.response_len * shape.vocab * act_b
    elif rollout:  # RL scoring (reference, old log-probs): one chunk of the LM head at a time
        scored = min(s.forward_batch, max(rows_gen, 1)) * s.response_len
        parts["logits (no-grad pass)"] = 2 * min(scored, chunk_rows) * shape.vocab * 4
    else:
        parts["logits (no-grad pass)"] = 0
    parts["rollout engine"] = 0
    parts["KV cache"] = 0
    parts["merged rollout copy"] = 0
    if rollout and s.rollout_backend == "vllm":
        parts["rollout engine"] = -1  # a share of the device, filled in by plan_run
        p.notes.append(f"vLLM reserves rollout.gpu_memory_utilization={s.gpu_memory_utilization} of the GPU "
                       "for its weights and KV cache" + (" (asleep while training)" if s.sleep_when_training else ""))
    elif rollout:
        chunk = min(s.forward_batch, max(rows_gen, 1))
        parts["KV cache"] = chunk * (s.prompt_len + s.response_len) * shape.kv_bytes_per_token(b)
        if s.merged_copy and (lora or shard > 1):  # full fine-tuning: a whole copy beside the shards
            parts["merged rollout copy"] = n * b
    return p


def _finish(p: ProcessPlan, s: Setup, runtime: int, device_bytes: int | None) -> ProcessPlan:
    """The peak: what the process always holds plus its largest phase."""
    parts = p.parts
    if parts.get("rollout engine") == -1:
        parts["rollout engine"] = int(s.gpu_memory_utilization * device_bytes) if device_bytes else 0
    parts["runtime"] = runtime
    act = parts.get("activations (checkpointing)" if s.checkpointing else "activations", 0)
    held = parts["runtime"] + parts["weights"] + parts["optimizer state"] + parts["merged rollout copy"]
    phases = {"train": parts["gradients"] + act + parts["logits"],
              "generate": parts["KV cache"], "score": parts["logits (no-grad pass)"]}
    if parts["rollout engine"]:
        if s.sleep_when_training:
            phases["generate"] += parts["rollout engine"]
        else:
            held += parts["rollout engine"]
    p.peak_phase = max(phases, key=phases.get)
    p.peak = held + phases[p.peak_phase]
    return p


def plan_run(cfg: RunConfig, shape: ModelShape | None = None, *, device: str | None = None,
             memory_bytes: int | None = None, peak_tflops: float | None = None,
             efficiency: float | None = None, setup: Setup | None = None,
             memory_what: str = "stated memory") -> Plan:
    """The plan of `cfg`. device: cpu | cuda (default: the model's, `auto` = cuda when present).
    memory_bytes: what each GPU (cuda) or the machine (cpu) has; default: measured here."""
    if cfg.algo.name not in ("sft", "dpo", "rm", "grpo", "ppo"):
        raise ConfigError(f"algo={cfg.algo.name}: the planner covers sft, dpo, rm, grpo and ppo; plan a "
                          "pipeline's stages one at a time with their overrides")
    device = device or _resolve_device(cfg.model.device)
    shape = shape or read_model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code)
    s = setup or Setup.from_config(cfg, device)
    return _plan(s, shape, memory_bytes, peak_tflops, efficiency, memory_what=memory_what)


def _plan(s: Setup, shape: ModelShape, memory_bytes, peak_tflops, efficiency, check: bool = True,
          memory_what: str = "stated memory") -> Plan:
    cuda = s.device.startswith("cuda")
    available, what = (memory_bytes, memory_what) if memory_bytes else _available(cuda)
    runtime = (lambda kind: CUDA_CONTEXT_BYTES) if cuda else CPU_RUNTIME_BYTES.__getitem__
    procs = []
    if s.algo in ("grpo", "ppo"):
        if s.placement == "split":
            groups = [("actor+reference+rollout", ("actor",), True)]
            groups += [("critic", ("critic",), False)] if "critic" in s.roles else []
        else:
            groups = [("+".join(s.roles) + "+reference+rollout", s.roles, True)]
        rows_gen = max(s.rollout_rows // max(s.world, 1), 1)
        for name, roles, rollout in groups:
            p = _model_process(s, shape, f"worker {name}", roles, rollout=rollout, trains=True, rows_gen=rows_gen)
            procs.append(_finish(p, s, runtime("ray_worker"), available if cuda else None))
        if s.reward_model and s.placement == "split":
            rs = replace(s, finetune="lora" if s.reward_model == "role" else "full")
            p = _model_process(rs, shape, "worker reward", ("reward",), rollout=False, trains=False, rows_gen=rows_gen)
            p.notes.append("a classifier reward model is sized as the policy's base; plan its own config for more")
            procs.append(_finish(p, rs, runtime("ray_worker"), None))
        driver = ProcessPlan(name="driver (Ray, no model)", count=1)
        driver.parts = {"runtime": CPU_RUNTIME_BYTES["driver"]}
        driver.peak, driver.peak_phase = driver.parts["runtime"], "-"
        procs.append(driver)
    else:
        p = _model_process(s, shape, f"{s.algo} trainer (in-process)", s.roles, rollout=False, trains=True)
        p.count = 1
        procs.append(_finish(p, s, runtime("trainer"), None))

    flops = step_flops(s, shape)
    peak, peak_source = (peak_tflops * 1e12, "stated") if peak_tflops else _peak_flops(cuda)
    eff = efficiency if efficiency is not None else (0.35 if cuda else 0.1)
    devices = s.world * (len(procs) - 1 if s.algo in ("grpo", "ppo") and s.placement == "split" else 1)
    plan = Plan(s, shape, procs, flops, flops / (peak * eff * max(devices, 1)), peak, eff, available, what,
                peak_source=peak_source)
    if check:
        _check_fit(plan)
    return plan


def step_flops(s: Setup, shape: ModelShape) -> float:
    """FLOPs of one optimizer step (SFT, DPO, RM) or one RL iteration, all processes together."""
    n = shape.params
    attn = 2 * shape.layers * s.seq_len * shape.hidden  # per token, forward (Kaplan et al. Table 1)
    fwd = 2 * n + attn
    train = fwd * (3 if s.finetune == "full" else 2) + (fwd if s.checkpointing else 0)
    if s.algo in ("sft", "rm", "dpo"):
        rows = s.micro_batch * s.grad_accum * (2 if s.algo in ("dpo", "rm") else 1)
        tokens = rows * s.seq_len if s.algo != "dpo" else s.micro_batch * s.grad_accum * (
            s.prompt_len + 2 * s.response_len)
        return tokens * train + (tokens * fwd if s.reference_copy else 0)
    tokens = s.rollout_rows * s.seq_len
    generate = s.rollout_rows * s.response_len * fwd + s.rollout_rows * s.prompt_len * fwd
    scoring = tokens * fwd * (1 + ("critic" in s.roles) + bool(s.reward_model))  # reference, values, reward
    update = tokens * train * s.ppo_epochs * len(s.roles)
    return generate + scoring + update


def _check_fit(plan: Plan) -> None:
    """Which processes do not fit, and the knobs that would make them fit (each re-planned)."""
    if plan.available_bytes is None:
        return
    cuda = plan.setup.device.startswith("cuda")
    need = max(p.peak for p in plan.processes) if cuda else sum(p.peak * p.count for p in plan.processes)
    if need <= plan.available_bytes:
        return
    worst = max(plan.processes, key=lambda p: p.peak)
    top = max((k for k in worst.parts if k != "runtime" and "checkpointing" not in k),
              key=lambda k: worst.parts[k])
    plan.problems.append(f"{'per GPU' if cuda else 'all processes'} {_gib(need)} > {plan.available_what} "
                         f"{_gib(plan.available_bytes)}; the largest part: {top} of {worst.name} "
                         f"({_gib(worst.parts[top])})")
    def need_of(setup: Setup) -> int:
        trial = _plan(setup, plan.shape, plan.available_bytes, None, None, check=False)
        return max(p.peak for p in trial.processes) if cuda else sum(p.peak * p.count for p in trial.processes)

    for override, setup in _fix_candidates(plan.setup):
        trial_need = need_of(setup)
        if trial_need >= need:
            continue  # this knob does not touch the part that sets the peak
        plan.fixes.append(f"{override}: {_gib(trial_need)}" + (" (fits)" if trial_need <= plan.available_bytes else ""))
    # The knobs together, greedily: each round takes the one that saves the most.
    setup, chosen = plan.setup, []
    while need > plan.available_bytes:
        options = [(need_of(st), o, st) for o, st in _fix_candidates(setup)]
        if not options or min(options, key=lambda x: x[0])[0] >= need:
            break
        need, override, setup = min(options, key=lambda x: x[0])
        chosen.append(override)
    if len(chosen) > 1:
        verdict = "fits" if need <= plan.available_bytes else "still does not fit"
        plan.fixes.append(f"together: {' '.join(chosen)}: {_gib(need)} ({verdict})")


def _fix_candidates(s: Setup) -> list:
    """(override, Setup) for each knob that lowers memory."""
    out = []
    if s.finetune == "full":
        out.append(("model.finetune=lora", replace(s, finetune="lora")))
    if not s.checkpointing:
        out.append(("trainer.gradient_checkpointing=true",
                    replace(s, checkpointing=True)))
    if s.strategy != "fsdp2":
        for world in (max(s.world, 2), max(s.world, 8)):
            out.append((f"trainer.strategy=fsdp2 cluster.num_replicas={world}",
                        replace(s, strategy="fsdp2", world=world)))
    rl = s.algo in ("grpo", "ppo")
    if s.max_tokens and s.max_tokens > s.seq_len * 2:  # a packed micro-batch is cut by its token budget
        quarter = max(s.seq_len * 2, s.max_tokens // 4)
        out.append((f"trainer.max_tokens_per_micro={quarter}", replace(s, max_tokens=quarter)))
    elif s.micro_batch > 1 and rl:  # RL: trainer.batch_size is the micro-batch of each minibatch
        quarter = max(1, s.micro_batch // 4)
        out.append((f"trainer.batch_size={quarter}", replace(s, micro_batch=quarter)))
    elif s.micro_batch > 1:
        half = max(1, s.micro_batch // 4)
        out.append((f"trainer.batch_size={half} trainer.grad_accum={s.grad_accum * s.micro_batch // half}",
                    replace(s, micro_batch=half, grad_accum=s.grad_accum * s.micro_batch // half)))
    if rl:
        if s.merged_copy and s.finetune == "lora":
            out.append(("rollout.merged_copy=false", replace(s, merged_copy=False)))
        if s.forward_batch > 8:
            quarter = s.forward_batch // 4
            out.append((f"algo.forward_batch_size={quarter}", replace(s, forward_batch=quarter)))
        if s.placement == "colocated" and "critic" in s.roles:
            out.append(("cluster.placement=split", replace(s, placement="split")))
    return out


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _available(cuda: bool) -> tuple:
    """Memory of one GPU (cuda) or available to processes on this machine (cpu)."""
    if cuda:
        import torch

        if not torch.cuda.is_available():
            return None, "no GPU here (pass --memory-gib)"
        free, _ = torch.cuda.mem_get_info()
        return free, f"free on {torch.cuda.get_device_name()}"
    try:
        import psutil

        return psutil.virtual_memory().available, "available RAM"
    except ImportError:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable"), "available RAM"


def _peak_flops(cuda: bool) -> tuple:
    """(FLOP/s, where the figure comes from) of one device."""
    if cuda:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} bf16 data sheet"
        return GPU_PEAK_TFLOPS["A100"] * 1e12, "A100 bf16 assumed; pass --peak-tflops"
    cores = os.cpu_count() or 1
    return cores * CPU_FLOPS_PER_CORE, f"{cores} cores x 2.5 GHz x 32 FLOP/cycle assumed; pass --peak-tflops"


# -------------------------------------------------------------------------------------- output


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / MIB:.1f} MiB"


def format_plan(plan: Plan) -> str:
    s, sh = plan.setup, plan.shape
    lines = [(f"plan: algo={s.algo} model {sh.params / 1e6:.2f}M params ({sh.layers} layers, hidden {sh.hidden}, "
              f"vocab {sh.vocab}), finetune={s.finetune}, {s.dtype_bytes} bytes/param, precision={s.precision}, "
              f"strategy={s.strategy}, replicas={s.world}, placement={s.placement}, device={s.device}"),
             (f"      micro-batch {s.micro_batch} x {s.seq_len} tokens (prompt {s.prompt_len} + response "
              f"{s.response_len})" + (f", packed: at most {s.max_tokens} tokens" if s.max_tokens else "")
              + f", gradient checkpointing {'on' if s.checkpointing else 'off'}")]
    for p in plan.processes:
        lines.append(f"  {p.name}  x{p.count}")
        for key, value in p.parts.items():
            if value or key in ("weights", "gradients", "optimizer state", "activations", "logits"):
                lines.append(f"    {key:<30}{_gib(value):>12}")
        lines.append(f"    {'peak per process':<30}{_gib(p.peak):>12}   (held + the {p.peak_phase} phase)")
        lines.extend(f"    note: {n}" for n in p.notes)
    runtime = "the CUDA context" if s.device.startswith("cuda") else (
        "the measured resident size of a Python process with torch, transformers and peft loaded (CPU_RUNTIME_BYTES)")
    lines.append(f"  runtime = {runtime}; the longest batch (sequences at the configured maxima) is planned")
    if s.finetune == "full" and s.precision == "model" and s.dtype_bytes == 2:
        lines.append("  note: AdamW keeps its moments in the parameters' bf16 (torch.optim.AdamW); fp32 master weights"
                     " would add 12 bytes per parameter")
    lines.append(f"  compute: {plan.flops_per_step:.3g} FLOPs per step; at {plan.peak_flops / 1e12:.3g} TFLOP/s peak "
                 f"({plan.peak_source}) x {plan.efficiency:.0%} efficiency: {plan.seconds_per_step:.3g} s per step")
    if plan.available_bytes is None:
        lines.append(f"  memory: {plan.available_what}")
    elif plan.fits:
        lines.append(f"  fits: {plan.available_what} {_gib(plan.available_bytes)}")
    else:
        lines.extend(f"  DOES NOT FIT: {p}" for p in plan.problems)
        lines.extend(f"    try {f}" for f in plan.fixes)
    return "\n".join(lines)


# --------------------------------------------------------------------------------- entry points


def check_memory(cfg: RunConfig, *, stream=sys.stderr, memory_bytes: int | None = None) -> Plan | None:
    """The start-up check (`trainer.check_memory`): warn, or (strict) raise ConfigError, when the
    plan does not fit this machine. Plans that cannot be made (another stage, an unreadable config)
    are skipped with a note: the run itself reports those errors."""
    mode = getattr(cfg.trainer, "check_memory", "warn")
    if mode == "off" or cfg.algo.name not in ("sft", "dpo", "rm", "grpo", "ppo"):
        return None
    if cfg.algo.name in ("grpo", "ppo") and cfg.cluster.address != "local":
        return None  # the workers run on other machines: `python -m align plan --memory-gib ...` sizes them
    if memory_bytes is None and not _resolve_device(cfg.model.device).startswith("cuda"):
        memory_bytes = _own_rss() + _available(False)[0]  # this process is already resident
        what = "available RAM (and this process's own)"
    else:
        what = "stated memory"
    try:
        plan = plan_run(cfg, memory_bytes=memory_bytes, memory_what=what)
    except Exception as exc:  # noqa: BLE001 - the run reports its own errors; the check must not mask them
        print(f"align: memory check skipped: {exc}", file=stream)
        return None
    if not plan.fits:
        message = ("; ".join(plan.problems) + ". Try: " + "; ".join(plan.fixes)
                   + " (python -m align plan ... for details)")
        if mode == "strict":
            raise ConfigError(f"trainer.check_memory=strict: the run will not fit: {message}")
        print(f"align: WARNING: the run may not fit: {message}", file=stream)
    return plan


def _own_rss() -> int:
    with open("/proc/self/status") as f:
        return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)


def main(argv: list) -> int:
    """`python -m align plan [--json] [--device ...] [--memory-gib ...] [overrides ...]`."""
    ap = argparse.ArgumentParser(prog="python -m align plan", description="Will this run fit? (align/plan.py)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="plan for this device (default: model.device)")
    ap.add_argument("--memory-gib", type=float, help="memory per GPU (cuda) or of the machine (cpu)")
    ap.add_argument("--peak-tflops", type=float, help="peak FLOP/s of one device, in TFLOP/s")
    ap.add_argument("--efficiency", type=float, help="fraction of the peak reached (MFU)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("overrides", nargs="*", help="the same Hydra overrides as the run")
    args = ap.parse_args(argv)
    from align.config import compose

    try:
        cfg, _ = compose(args.overrides)
        plan = plan_run(cfg, device=args.device, peak_tflops=args.peak_tflops, efficiency=args.efficiency,
                        memory_bytes=int(args.memory_gib * GIB) if args.memory_gib else None)
    except ConfigError as exc:
        print(f"align plan: configuration error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.as_dict(), indent=1) if args.json else format_plan(plan))
    return 0 if plan.fits else 1
