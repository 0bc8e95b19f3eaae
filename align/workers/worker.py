"""`ModelWorker`: the process that hosts the model and serves the driver's coarse verbs.

One worker holds one copy of the model (the shared multi-head model with LoRA, or separate
models with full fine-tuning) and, when it hosts the actor, the rollout engine: the HF engine
over a merged copy of the LoRA actor or a whole copy of a replicated fully fine-tuned one (rewritten
at each sync from the gathered weights), or over the actor's own parameters (nothing to sync),
or a vLLM engine synced with the actor's adapter or weights
(`rollout.backend=vllm`). A reward model with a base of its own is a `SequenceScorer` beside
the model (colocated) or alone in a `ScorerWorker` (split placement).
Verbs take and return `Experience` shards and plain dicts:

    generate(prompts, group_ids, params) -> Experience     rollouts (actor role)
    annotate(batch, roles) -> {field: tensor}               one no-grad pass, several roles
    update_actor(minibatches, normalisers, loss) -> stats   clipped policy loss (+ KL in loss)
    update_critic(minibatches, normalisers, loss) -> stats  clipped value loss
    save(dir) / load(dir)                                   adapters, heads, optimizer states

With N data-parallel replicas, each worker runs its shard of every minibatch and the gradients
are summed over the replicas (gloo on CPU) before the optimizer step. The driver passes each
minibatch's *global* loss normaliser, so the per-replica losses add up to the whole-minibatch
loss and the summed gradient equals one replica's gradient on the whole minibatch.

The class is plain Python: the driver wraps it with `ray.remote` (align/workers/group.py), and
tests may also build it in-process.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import Tensor

from align.config import ModelConfig, RolloutConfig, TrainerConfig
from align.engine import TrainEngine, fill_from_rank0
from align.models.scorer import reward_model_kind
from align.trainers.checkpoint import rng_state, set_rng_state
from align.trainers.setup import model_device
from align.workers.batch import Experience, _pad_to, from_rollout

# annotate(): which Experience field each role fills.
ROLE_FIELDS = {"reference": "ref_logp", "actor": "old_logp", "critic": "values", "reward": "rm_scores"}
OPTIMIZER_FILE = "optimizer.pt"
# Each replica's RNG states (python, numpy, torch CPU and CUDA): align.trainers.checkpoint.rng_state.
RNG_FILE, TORCH_RNG_FILE = "rng_rank{rank}.json", "torch_rng_rank{rank}.pt"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker builds.

    roles: the trainable roles it hosts (actor, critic, reward); a worker with the actor also
        serves the reference (adapters off with LoRA; a frozen copy with full fine-tuning) and
        the rollout engine. reward_model_path: a `save_role("reward")` folder loaded into the
        reward role (frozen). critic_init_from_reward: copy the reward adapter and score head
        into the critic's adapter and value head at start. The optimizer is the trainer's
        (`trainer.optimizer`: AdamW, or plain SGD for tests that compare gradients through the
        weights). merged_rollout: with a LoRA actor on an
        unquantized base, generate from a plain copy of the base with the actor's adapter merged
        in, refreshed at every weight sync (`rollout.merged_copy`); otherwise generate through
        the adapter on the shared weights. With full fine-tuning under ddp or fsdp2 replicas,
        generate from a whole copy of the actor taken before sharding and refreshed at every sync
        (one replica's engine runs on the actor itself, so no copy is kept). fast_decode: `rollout.fast_decode`,
        for the HF engine.
        rollout: the rollout config; with `backend=vllm` the actor's worker runs a vLLM engine over
        `model.name_or_path` (see `ModelWorker._vllm_engine`), at most `max_model_len` tokens a
        sequence (and at most the model's context).
    """

    model: ModelConfig
    trainer: TrainerConfig
    roles: tuple[str, ...] = ("actor",)
    reward_model_path: Optional[str] = None
    critic_init_from_reward: bool = False
    critic_lr: Optional[float] = None
    forward_batch_size: int = 64
    seed: int = 0
    num_threads: int = 1
    merged_rollout: bool = True
    fast_decode: bool = True
    rollout: RolloutConfig = RolloutConfig()
    max_model_len: Optional[int] = None


@dataclass(frozen=True)
class ActorLoss:
    """Options of the policy loss (`policy_loss` in align.core.POLICY_LOSSES, grpo_kl_loss) and of
    the rollout correction (align.core.rollout_correction: `none`, `tis` or `mis`, at `token` or
    `sequence` level, capped at `correction_cap`)."""

    clip_eps_low: float = 0.2
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    agg: str = "token-mean"
    kl_coef: float = 0.0  # > 0: k-estimator KL to the reference inside the loss (GRPO)
    kl_kind: str = "k3"
    entropy_coef: float = 0.0  # > 0: an entropy bonus, aggregated like the policy loss
    micro_batch_size: int = 8
    policy_loss: str = "ppo"
    rollout_correction: str = "none"
    correction_level: str = "token"
    correction_cap: float = 2.0

    @classmethod
    def from_config(cls, algo, micro_batch_size: int, *, kl_in_loss: bool) -> "ActorLoss":
        """The loss an RL algorithm config asks for (GRPO puts its KL in the loss; PPO in the reward)."""
        return cls(clip_eps_low=algo.clip_eps_low, clip_eps_high=algo.clip_eps_high, dual_clip=algo.dual_clip,
                   agg=algo.loss_agg, kl_coef=algo.kl_coef if kl_in_loss else 0.0, kl_kind=algo.kl_kind,
                   entropy_coef=algo.entropy_coef, micro_batch_size=micro_batch_size, policy_loss=algo.policy_loss,
                   rollout_correction=algo.rollout_correction, correction_level=algo.rollout_correction_level,
                   correction_cap=algo.rollout_correction_cap)


@dataclass(frozen=True)
class CriticLoss:
    """Options of the value loss (align.core.ppo_value_loss)."""

    value_clip: Optional[float] = 0.2
    agg: str = "token-mean"
    vf_coef: float = 1.0
    micro_batch_size: int = 8


class ModelWorker:
    """Hosts one model replica; see the module docstring for the verbs."""

    def __init__(self, spec: WorkerSpec, name: str = "worker", rank: int = 0, world_size: int = 1):
        from align.trainers.common import seed_everything

        self.spec, self.name, self.rank, self.world_size = spec, name, rank, world_size
        torch.set_num_threads(max(1, spec.num_threads))
        seed_everything(spec.seed)
        if str(spec.model.device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"model.device={spec.model.device} but this worker sees no GPU "
                               f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): did it ask Ray for one?")
        # Replicas but rank 0 build on the meta device; the engine's prepare fills them from rank 0.
        meta = TrainEngine.init_on_meta(spec.trainer.strategy, rank, world_size)
        self.model, self.tokenizer = build_role_model(spec, meta=meta)
        self.model.packed = spec.trainer.max_tokens_per_micro is not None  # padding-free passes
        self.device = model_device(self.model, spec.model)  # batches arrive on the CPU
        # Strategy, precision, checkpointing, the replicas' gradient reduction, clipping and the step
        # (align/engine). With replicas, the model is prepared (broadcast or sharded) once their group exists.
        self.train_engine = TrainEngine(spec.trainer.precision, self.device, world_size,
                                        strategy=spec.trainer.strategy,
                                        activation_checkpointing=spec.trainer.gradient_checkpointing,
                                        shard_size=spec.trainer.fsdp_shard_size)
        # A reward model with a base of its own (reward.model_path a classifier, not a reward role).
        self.scorer = build_scorer(spec)
        self.engine, self.rollout_model = None, None
        # The policy version the engine generates with, when weights are published to it (a
        # rollout-group worker under rollout.mode=async); None: the engine follows this worker's actor.
        self.policy_version: int | None = None
        # rollout.partial_rollouts: set_actor_weights runs in its own thread (a Ray concurrency group);
        # while a generation runs it leaves the weights here and the decode loop loads them between steps.
        self._weights = threading.Condition()
        self._generating = False
        self._pending: tuple[dict, int] | None = None
        self._token_versions: dict[int, list[int]] = {}
        self._adapter_targets: dict[str, Tensor] | None = None  # set_actor_weights: peft key -> live tensor
        if "actor" in self.model.roles and spec.rollout.backend == "vllm":
            self.engine = self._vllm_engine()
            if not meta:  # a meta-built replica syncs once prepared (`_prepare_training`)
                self.sync_rollout()  # the actor as it starts (an adapter of zeros reads as the base)
        elif "actor" in self.model.roles:
            from rollout.hf import HFEngine

            engine_kw = dict(max_batch_size=spec.forward_batch_size, eos_token_id=self.tokenizer.eos_token_id,
                             fast_decode=spec.fast_decode)
            if spec.merged_rollout and self.model.can_merge_actor or self._full_actor_copy:
                # LoRA layers cost ~40% of a decode step on CPU; a merged copy runs at the bare model's speed.
                # Sharded full fine-tuning: a whole copy, taken before sharding, so decoding never gathers.
                self.rollout_model = self.model.merged_actor_copy()
                self.engine = HFEngine(self.rollout_model, self.tokenizer, **engine_kw)
            else:
                self.engine = HFEngine(self.model, self.tokenizer, role=lambda: self.model.using("actor"), **engine_kw)
        self.optimizers, self.schedulers = {}, {}
        if world_size == 1:
            self._prepare_training()
        self.model.train()

    @property
    def _full_actor_copy(self) -> bool:
        """Whether the HF engine generates from a whole copy of a fully fine-tuned actor
        (`rollout.merged_copy` under ddp or fsdp2 replicas, whose FSDP2 units hold DTensor
        parameters gathered only inside the engine's forward; as veRL's rollout holds its own
        weights). One replica (`single`) generates on the actor itself: nothing to copy or sync."""
        return self.spec.merged_rollout and not self.model.is_lora and self.train_engine.hooked

    def _prepare_training(self) -> None:
        """The engine's strategy and precision on the model, then each trainable role's optimizer."""
        from align.trainers.common import build_optimizer, build_scheduler

        spec = self.spec
        self.train_engine.prepare(self.model)
        self.model.same_passes = self.train_engine.hooked
        if self.train_engine.materialized:  # replicas built on the meta device were filled from rank 0
            if self.rollout_model is not None:  # the rollout copy (whole on every replica): rank 0's
                fill_from_rank0(self.rollout_model, self.device)
            else:  # a vLLM engine takes the filled actor (any other engine needs nothing)
                self.sync_rollout()
        for role in ("actor", "critic"):
            if role in self.model.roles:
                tcfg = spec.trainer
                if role == "critic" and spec.critic_lr is not None:
                    from dataclasses import replace

                    tcfg = replace(tcfg, lr=spec.critic_lr)
                params = self.model.trainable_parameters(role)
                self.optimizers[role] = build_optimizer(params, tcfg)
                self.schedulers[role] = build_scheduler(self.optimizers[role], tcfg)

    # ---- plumbing --------------------------------------------------------------------------------
    def info(self) -> dict:
        return worker_info(self.name, self.rank, list(self.model.roles) + (["reward"] if self.scorer is not None else []))

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port, for rank 0 to host the process group."""
        import socket

        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        """Join the replicas' process group (`distributed.backend`: gloo on CPU, NCCL and gloo on GPU)."""
        import torch.distributed as dist

        from align.engine import distributed

        backend = distributed.backend(torch.cuda.is_available() and self.spec.model.device != "cpu")
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}",
                                rank=self.rank, world_size=self.world_size)
        self._prepare_training()

    # ---- rollout and inference -------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], group_ids: Sequence[int], params,
                 min_version: int | None = None, reference: bool = False) -> Experience:
        """`params.n` samples of each prompt with the actor role (the HF or vLLM engine; a vLLM
        engine that sleeps between rollouts is woken for the call and put back to sleep).
        min_version (partial rollouts): first wait until policy version `min_version` is loaded.
        reference: also fill `ref_logp` (`annotate`), as a rollout-group worker does with
        `rollout.producer_reference`."""
        if not prompts:
            return _empty_experience()
        batch = self._generate(prompts, group_ids, params, min_version)
        if not reference:
            return batch
        with self._weights:  # partial rollouts: no weight update lands during the pass
            return batch.replace(**self.annotate(batch, ("reference",)))

    def _generate(self, prompts, group_ids, params, min_version: int | None) -> Experience:
        if self.spec.rollout.partial_rollouts and (min_version is not None or self.policy_version is not None):
            return self._generate_partial(prompts, group_ids, params, min_version)
        if self._sleeps:
            self.engine.wake_up()
        try:
            return self._tag(from_rollout(prompts, group_ids, self.engine.generate(prompts, params)))
        finally:
            if self._sleeps:
                self.engine.sleep()  # the engine's GPU memory goes back to training until the next rollout

    def generate_episodes(self, rows: Sequence[dict], group_ids: Sequence[int], params, env,
                          max_prompt_length: int) -> Experience:
        """`params.n` multi-turn episodes of each data row with environment `env` (an EnvConfig),
        run by this worker's engine (rollout/multiturn.py): environment tokens masked out of the loss."""
        from align.workers.batch import from_episodes
        from rollout.multiturn import run_episodes

        if not rows:
            return _empty_experience()
        if self._sleeps:
            self.engine.wake_up()
        try:
            return self._tag(from_episodes(run_episodes(
                self.engine, self.tokenizer, rows, group_ids, env_name=env.name, env_options=dict(env.options),
                params=params, max_turns=env.max_turns, max_total_tokens=env.max_total_tokens,
                max_prompt_length=max_prompt_length)))
        finally:
            if self._sleeps:
                self.engine.sleep()

    @torch.no_grad()
    def annotate(self, batch: Experience, roles: Sequence[str]) -> dict[str, Tensor]:
        """No-grad passes per chunk for `roles`: {"ref_logp", "old_logp", "values": (B, R),
        "rm_scores": (B,)}. Policy log-probs run each distinct prompt once for its group's rows
        (`response_log_probs`, at the rollout temperature); values and scores run whole rows. A
        reward model of its own base (`self.scorer`) scores the batch's text."""
        R = batch.response_ids.shape[1]
        scored = {}
        if "reward" in roles and self.scorer is not None:
            scored["rm_scores"] = self.scorer.score_batch(batch, self.tokenizer)
            roles = [r for r in roles if r != "reward"]
            if not roles:
                return scored
        out: dict[str, list[Tensor]] = {ROLE_FIELDS[r]: [] for r in roles}
        policies = [r for r in roles if r in ("reference", "actor")]  # log-probs: a prompt shared by G rows runs once
        others = tuple(r for r in roles if r not in policies)
        was_training = self.model.training
        self.model.eval()  # inference: no LoRA dropout

        def passes(part: Experience) -> dict[str, Tensor]:
            res = {role: self.model.response_log_probs(part.prompt_ids, part.prompt_mask, part.response_ids,
                                                       part.response_attention_mask, role=role,
                                                       temperature=self.temperature)
                   for role in policies}
            if others:
                res.update({role: value[:, part.response_slice] if role == "critic" else value
                            for role, value in self.model.multi_role_forward(
                                part.input_ids, part.attention_mask, roles=others).items()})
            return res

        cuts = micro_batch_rows(batch, self.spec.forward_batch_size, self.spec.trainer.max_tokens_per_micro)
        try:
            for part, real in self._in_step([batch.select(rows) for rows in cuts], batch):
                part = part.trim().to(self.device)
                with self.train_engine.autocast():  # the training forward's precision
                    res = self.train_engine.forward(passes, part)
                if not real:
                    continue
                for role, value in res.items():
                    if role != "reward":
                        value = _pad_to(value.float(), R, left=False)
                    out[ROLE_FIELDS[role]].append(value.float().cpu())
        finally:
            self.model.train(was_training)
        # Token-budget cuts reorder the rows: put them back in batch order.
        inverse = torch.argsort(torch.tensor([i for rows in cuts for i in rows], dtype=torch.long))
        return {**{k: torch.cat(v)[inverse] if v else torch.zeros(0, R) for k, v in out.items()}, **scored}

    # ---- updates --------------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        """The temperature every RL log-prob and entropy is computed at: the rollout's, so the
        trainer scores tokens under the distribution the engine sampled them from."""
        return self.spec.rollout.temperature

    def update_actor(self, minibatches: Sequence[Experience], normalisers: Sequence[float], loss: ActorLoss) -> dict:
        """One optimizer step per minibatch (this replica's shard of it), in micro-batches.

        The behaviour policy is the rollout engine's: each token's loss is weighted by the
        rollout correction pi_old / mu (`loss.rollout_correction`), and the sampler/trainer gap is
        logged as mismatch/* whenever the engine's log-probs are there."""
        from align.core import POLICY_LOSSES, grpo_kl_loss, rollout_correction
        from align.core.masked import aggregate_loss, masked_mean

        policy_loss = POLICY_LOSSES.get(loss.policy_loss)
        extra = {"dual_clip": loss.dual_clip} if loss.policy_loss == "ppo" else {}

        def micro_loss(mb: Experience, normaliser: float):
            with self.train_engine.autocast():
                out = self.train_engine.forward(
                    self.model.response_log_probs, mb.prompt_ids, mb.prompt_mask, mb.response_ids,
                    mb.response_attention_mask,  # environment tokens attended
                    temperature=self.temperature, entropy=loss.entropy_coef > 0)
            logp, entropy = out if loss.entropy_coef > 0 else (out, None)
            # No recomputed old log-probs: the update is on-policy (one step per iteration), so the
            # live log-probs are pi_old (ratio 1).
            old = mb.old_logp if mb.old_logp is not None else logp.detach()
            means, weights = {}, None
            if mb.rollout_logp is not None:
                weights, mismatch = rollout_correction(old, mb.rollout_logp, mb.response_mask, loss.rollout_correction,
                                                       loss.correction_level, loss.correction_cap)
                means.update({f"mismatch/{k}": v for k, v in mismatch.items()})
                weights = None if loss.rollout_correction == "none" else weights
            pg_loss, pg_stats = policy_loss(logp, old, mb.advantages, mb.response_mask,
                                            clip_eps_low=loss.clip_eps_low, clip_eps_high=loss.clip_eps_high,
                                            agg=loss.agg, normaliser=normaliser, weights=weights, **extra)
            means.update(pg_stats)
            parts, total = {"pg_loss": pg_loss.detach()}, pg_loss
            if loss.kl_coef > 0:
                kl_loss, _ = grpo_kl_loss(logp, mb.ref_logp, mb.response_mask, loss.kl_kind,
                                          agg=loss.agg, normaliser=normaliser)
                total = total + loss.kl_coef * kl_loss
                parts["kl_loss"] = kl_loss.detach()
            if entropy is not None:
                bonus = aggregate_loss(entropy, mb.response_mask, loss.agg, normaliser)
                total = total - loss.entropy_coef * bonus
                means["entropy"] = masked_mean(entropy.detach(), mb.response_mask)
            return total, parts, means

        return self._update("actor", minibatches, normalisers, loss.micro_batch_size, micro_loss)

    def update_critic(self, minibatches: Sequence[Experience], normalisers: Sequence[float], loss: CriticLoss) -> dict:
        """Clipped value regression on the returns, one optimizer step per minibatch."""
        from align.core import ppo_value_loss

        def micro_loss(mb: Experience, normaliser: float):
            with self.train_engine.autocast():
                values = self.train_engine.forward(self.model.values, mb.input_ids, mb.attention_mask)
            values = values[:, mb.response_slice].float()
            vf_loss, stats = ppo_value_loss(values, mb.values, mb.returns, mb.response_mask, loss.value_clip,
                                            loss.agg, normaliser)
            return loss.vf_coef * vf_loss, {"vf_loss": vf_loss.detach()}, stats

        return self._update("critic", minibatches, normalisers, loss.micro_batch_size, micro_loss)

    def _update(self, role, minibatches, normalisers, micro_batch_size, micro_loss) -> dict:
        """`micro_loss(micro, normaliser) -> (loss, parts, means)`: the micro-batch's share of the
        minibatch loss (normalised by the minibatch's global normaliser), the named shares it is
        made of (pg_loss, kl_loss, vf_loss: summed over micro-batches and replicas, like the loss),
        and statistics that are means over the micro-batch's tokens (token-weighted across them)."""
        params = self.model.trainable_parameters(role)
        optimizer, scheduler = self.optimizers[role], self.schedulers[role]
        stats = _StatSums()
        self.model.train()
        for mb, normaliser in zip(minibatches, normalisers):
            optimizer.zero_grad(set_to_none=True)
            step = {"loss": 0.0}
            cuts = micro_batch_rows(mb, micro_batch_size, self.spec.trainer.max_tokens_per_micro)
            micros = self._in_step([mb.select(rows) for rows in cuts], mb)
            for i, (micro, real) in enumerate(micros):
                micro = micro.trim().to(self.device)
                loss, parts, means = micro_loss(micro, normaliser)
                last = i == len(micros) - 1  # ddp: the replicas' all-reduce runs in this one's backward
                if not real:  # a stand-in keeping hooked replicas in step: no gradient, nothing logged
                    self.train_engine.backward(loss * 0, last=last)
                    continue
                self.train_engine.backward(loss, last=last)
                for k, v in {"loss": loss.detach(), **parts}.items():
                    step[k] = step.get(k, 0.0) + float(v)
                stats.add(means, weight=micro.num_response_tokens)
            grad_norm = self.train_engine.step(params, optimizer, self.spec.trainer.max_grad_norm)
            stats.add_step({**step, "grad_norm": grad_norm})
        scheduler.step()  # one schedule step per iteration: trainer.max_steps spans the run
        optimizer.zero_grad(set_to_none=True)
        return {**stats.state(), "lr": scheduler.get_last_lr()[0]}

    def _in_step(self, parts: Sequence[Experience], whole: Experience) -> list[tuple[Experience, bool]]:
        """`parts` paired with True, then, under ddp and fsdp2, stand-ins (False: the first row of
        `whole`) up to the most parts any replica runs: every replica's units must gather and reduce
        the same number of times. Replicas whose shard is empty run stand-ins only."""
        out = [(p, True) for p in parts]
        if self.train_engine.hooked:
            from align.engine import distributed

            count = distributed.all_max(len(out))
            if count > len(out) and len(whole) == 0:
                raise RuntimeError(f"{self.name}: an empty shard cannot stand in for a forward pass; "
                                   "give every replica at least one row (a larger batch, fewer replicas)")
            out += [(whole.split(1)[0], False)] * (count - len(out))
        return out

    # ---- state ---------------------------------------------------------------------------------
    def trainable_state(self, role: str) -> list[Tensor]:
        """Copies of `role`'s trainable tensors, in `trainable_parameters` order (for tests); whole
        when sharded (every replica calls it)."""
        from align.engine import full_tensor

        return [full_tensor(p.detach()).cpu().clone() for p in self.model.trainable_parameters(role)]

    def sync_rollout(self) -> int:
        """Bring the rollout engine up to date with the actor; returns the bytes copied. A merged
        copy gets W + scale * B @ A of every adapted layer, a full actor's copy every weight
        (gathered: every replica enters); a vLLM engine gets the actor's adapter
        (LoRA: a new adapter request, the base stays) or its full state dict (loaded in place); an
        engine over the actor's own parameters (or no engine) needs nothing."""
        if self.rollout_model is not None:
            with self.train_engine.gathered(self.model):  # every replica: sharded weights are gathered
                return self.model.refresh_merged_actor(self.rollout_model)
        if self.engine is None or self.spec.rollout.backend != "vllm":
            return 0
        with self.train_engine.gathered(self.model):
            tensors = self.model.sync_state_dict("actor")
        if self._sleeps:
            self.engine.wake_up()  # it stays awake for the rollout that follows a sync
        self.engine.update_weights(**{"lora" if self.model.is_lora else "state_dict": tensors})
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def actor_weights(self) -> dict[str, Tensor] | None:
        """What a rollout worker needs to generate as this actor (`sync_state_dict`: the LoRA
        adapter's tensors, or the full state dict), as CPU copies; every replica calls it (sharded
        weights are gathered), rank 0 returns it, the others None."""
        with self.train_engine.gathered(self.model):
            if self.rank != 0:
                return None
            return {k: v.detach().cpu().clone() for k, v in self.model.sync_state_dict("actor").items()}

    def set_actor_weights(self, tensors: dict[str, Tensor], version: int) -> int:
        """Take the trainer's actor (what `actor_weights` returned) as policy `version`: load it
        into this worker's actor and refresh the engine from it (`sync_rollout`). Later rollouts
        record `version` per sample (`Experience.policy_version`). With partial rollouts a
        generation in progress loads them at its next decode step. Returns the bytes received."""
        with self._weights:
            if self._generating:
                self._pending = (tensors, int(version))
            else:
                self._load_actor_weights(tensors, version)
            self._weights.notify_all()
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def _generate_partial(self, prompts, group_ids, params, min_version: int | None) -> Experience:
        """`generate` with weight updates loaded between decode steps; each token records the
        version it was sampled under (`token_versions`), each row its first token's."""
        with self._weights:
            if min_version is not None and not self._weights.wait_for(
                    lambda: self.policy_version is not None and self.policy_version >= min_version, timeout=600):
                raise TimeoutError(f"{self.name}: policy version {min_version} never arrived "
                                   f"(holding {self.policy_version})")
            self._generating, self._token_versions = True, {}
            start = self.policy_version
        try:
            out = self.engine.generate(prompts, params, on_step=self._between_steps)
        finally:
            with self._weights:
                self._generating = False
                if self._pending is not None:
                    self._load_actor_weights(*self._pending)
                    self._pending = None
        batch = from_rollout(prompts, group_ids, out)
        versions = torch.zeros_like(batch.response_ids)  # (B, R)
        first = torch.full((len(batch),), start, dtype=torch.long)
        for i, sample in enumerate(out.samples):
            seen = self._token_versions.get(i, [])[: len(sample.token_ids)]
            if seen:
                versions[i, : len(seen)] = torch.tensor(seen)
                first[i] = seen[0]
        return batch.replace(policy_version=first, token_versions=versions)

    def _between_steps(self, rows: list[int], tokens: list[int]) -> None:
        """The decode loop's hook: record the version of the tokens just sampled, then load
        weights published meanwhile, which the next step's forward uses."""
        for r in rows:
            self._token_versions.setdefault(r, []).append(self.policy_version)
        if self._pending is not None:
            with self._weights:
                pending, self._pending = self._pending, None
                if pending is not None:
                    self._load_actor_weights(*pending)

    def _load_actor_weights(self, tensors: dict[str, Tensor], version: int) -> None:
        from peft import set_peft_model_state_dict

        lm = getattr(self.model, "peft", None)  # MultiHeadModel's peft model
        if lm is None:
            lm = self.model.models["actor"]  # SeparateModels
        if self.model.is_lora:
            if self._adapter_targets is None:
                self._adapter_targets = adapter_tensors(lm, "actor")
            if self._adapter_targets is not None and set(tensors) == set(self._adapter_targets):
                with torch.no_grad():  # in place: ~0.1 ms, against ~20 ms for peft's generic loader
                    for k, v in tensors.items():
                        self._adapter_targets[k].copy_(v)
            else:
                set_peft_model_state_dict(lm, {k: v.to(self.device) for k, v in tensors.items()}, adapter_name="actor")
        else:
            with torch.no_grad():
                live = lm.state_dict()
                unknown = sorted(set(tensors) - set(live))
                if unknown:
                    raise KeyError(f"{self.name}: published weights name parameters the actor lacks: {unknown[:5]}")
                for k, v in tensors.items():
                    live[k].copy_(v)
        self.sync_rollout()
        self.policy_version = int(version)

    def _tag(self, batch: Experience) -> Experience:
        """Record the policy version that generated each row, when this worker's engine follows
        published weights."""
        if self.policy_version is None:
            return batch
        return batch.replace(policy_version=torch.full((len(batch),), self.policy_version, dtype=torch.long))

    @property
    def _sleeps(self) -> bool:
        """Whether the vLLM engine sleeps between rollouts (rollout.sleep_when_training)."""
        return self.spec.rollout.backend == "vllm" and self.spec.rollout.sleep_when_training

    def _vllm_engine(self):
        """A vLLM engine over the base model (`model.name_or_path`, in `model.dtype`), generating
        as the actor: with LoRA it takes the actor's adapter at every sync (a LoRA request on top
        of the untouched base, the reference), with full fine-tuning the actor's weights. On a GPU
        shared with training, `rollout.gpu_memory_utilization` bounds it and it sleeps between
        rollouts (`rollout.sleep_when_training`). vLLM loads the base itself: a quantized training
        base (QLoRA) is then paired with the unquantized one in rollouts."""
        from align.models.loading import resolve_dtype
        from rollout.vllm_engine import VLLMEngine

        m, r = self.spec.model, self.spec.rollout
        if self.world_size > 1:
            # An engine core in this process would initialise torch.distributed's default group for
            # itself (a world of one), which the replicas' group needs: run it in its own process
            # (vLLM's default on GPU; the CPU tests run it in-process for speed).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
        lora = self.model.is_lora
        with self.model.using("actor") as lm:
            model_context = getattr(lm.config, "max_position_embeddings", None)
        context = min(c for c in (self.spec.max_model_len, model_context, None if model_context else 2048) if c)
        kwargs = dict(trust_remote_code=True) if m.trust_remote_code else {}
        return VLLMEngine(
            m.name_or_path, tokenizer=m.tokenizer, dtype=str(resolve_dtype(m.dtype)).removeprefix("torch."),
            max_model_len=int(context), enable_lora=lora, max_lora_rank=m.lora.r,
            lora_config=self.model.peft.peft_config["actor"] if lora else None,
            gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=r.sleep_when_training,
            seed=self.spec.seed, **kwargs,
        )

    def save(self, path: str) -> None:
        """Every rank writes its own RNG states (LoRA dropout draws from them, and each replica
        draws for its own shard). One replica writes every role (adapter / weights and head) and
        the optimizer and schedule states under `path`; N replicas write the trainable weights
        and optimizer states sharded (DCP, each its shards: `align.trainers.checkpoint.
        save_sharded`, nothing gathered) and rank 0 the schedules."""
        from align.trainers.checkpoint import optimizer_state, save_sharded

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        plain, tensors = rng_state()
        (out / RNG_FILE.format(rank=self.rank)).write_text(json.dumps(plain))
        torch.save(tensors, out / TORCH_RNG_FILE.format(rank=self.rank))
        schedulers = {k: s.state_dict() for k, s in self.schedulers.items()}
        if self.world_size > 1:
            save_sharded(out, self.model, self.optimizers)
            if self.rank == 0:
                torch.save({"schedulers": schedulers}, out / OPTIMIZER_FILE)
            return
        self.model.save(str(out))
        torch.save({"optimizers": {k: optimizer_state(self.model, o) for k, o in self.optimizers.items()},
                    "schedulers": schedulers}, out / OPTIMIZER_FILE)

    def export_actor(self, path: str) -> str | None:
        """Rank 0 writes the trained actor as a Hugging Face folder (the LoRA adapter merged
        into the base) with its tokenizer: what `from_pretrained`, quantization and serving load."""
        with self.train_engine.gathered(self.model):  # every replica (sharded weights are gathered)
            if self.rank == 0:
                self.model.export_merged_actor(path, self.tokenizer)
        return path if self.rank == 0 else None

    def load(self, path: str) -> None:
        """Restore what `save` wrote, under any number of replicas (a sharded checkpoint is
        resharded to this run's replicas; a whole one is loaded by every replica into its shards),
        and each replica's RNG states. A checkpoint without this rank's RNG files (written by
        fewer replicas) resumes with a warning: dropout masks then differ from the uninterrupted run."""
        from align.trainers.checkpoint import SHARDED, load_optimizer_state, load_sharded

        state = torch.load(Path(path) / OPTIMIZER_FILE, weights_only=True)
        if (Path(path) / SHARDED).is_dir():
            load_sharded(path, self.model, self.optimizers)
        else:
            with self.train_engine.gathered(self.model, writeback=True):
                self.model.load(path)
            for k, o in self.optimizers.items():
                load_optimizer_state(self.model, o, state["optimizers"][k])
        for k, s in self.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.sync_rollout()
        plain, tensors = (Path(path) / f.format(rank=self.rank) for f in (RNG_FILE, TORCH_RNG_FILE))
        if plain.exists() and tensors.exists():
            set_rng_state(json.loads(plain.read_text()), torch.load(tensors, weights_only=True))
        else:
            import warnings

            warnings.warn(f"{self.name} rank {self.rank}: {plain} not found; its RNG starts from the seed, so LoRA "
                          "dropout will not match the uninterrupted run", stacklevel=2)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def micro_batch_rows(batch: Experience, rows: int, max_tokens: int | None, min_count: int = 1) -> list[list[int]]:
    """The row indices of `batch`'s micro-batches: consecutive pieces of `rows` rows, or (with
    `trainer.max_tokens_per_micro`) pieces of at most `max_tokens` real prompt + response tokens
    (align/data/packing.py `token_budget_micro_batches`; the model then runs them packed).
    Empty pieces (fewer rows than `min_count`) are left out."""
    if max_tokens is None:
        return [list(range(i, min(i + rows, len(batch)))) for i in range(0, len(batch), rows)]
    from align.data.packing import token_budget_micro_batches

    lengths = (batch.prompt_mask.long().sum(1) + batch.response_mask.long().sum(1)).tolist()
    return [b for b in token_budget_micro_batches(lengths, max_tokens, min_count) if b]


def adapter_tensors(lm, adapter: str) -> dict[str, Tensor] | None:
    """The live parameters behind `adapter`'s tensors in peft's saved key format (what
    `get_peft_model_state_dict` returns: views of them), so published weights can be copied in
    place; None when a key has no parameter of its own (peft's generic loader is used then)."""
    from peft import get_peft_model_state_dict

    params = {p.data_ptr(): p for p in lm.parameters()}
    saved = get_peft_model_state_dict(lm, adapter_name=adapter)
    out = {k: params.get(v.data_ptr()) for k, v in saved.items()}
    if any(p is None or p.shape != saved[k].shape for k, p in out.items()):
        return None
    return out


def build_role_model(spec: WorkerSpec, meta: bool = False):
    """The worker's model and tokenizer: a `MultiHeadModel` (model.finetune=lora: one base, an
    adapter per role from `model.lora`) or `SeparateModels` (full: a copy per role, the base as
    the frozen reference). meta: on the meta device, reading no weights (a saved reward role
    included): the engine's `prepare` fills it from rank 0's."""
    from align.trainers.setup import load_base, role_config

    mcfg = spec.model
    base, tokenizer = load_base(mcfg, meta)
    roles = tuple(spec.roles)
    if spec.reward_model_path and reward_model_kind(spec.reward_model_path) == "classifier":
        roles = tuple(r for r in roles if r != "reward")  # served by `build_scorer` instead
    elif spec.reward_model_path and "reward" not in roles:
        roles += ("reward",)
    if mcfg.finetune == "lora":
        from align.models.multihead import MultiHeadModel

        model = MultiHeadModel(base, {r: role_config(mcfg) for r in roles}, pad_token_id=tokenizer.pad_token_id)
    else:
        from align.models.separate import SeparateModels

        model = SeparateModels.from_base(base, roles, pad_token_id=tokenizer.pad_token_id)
    if "reward" in roles and spec.reward_model_path:
        if not meta:
            model.load_role("reward", spec.reward_model_path)
        for p in model.trainable_parameters("reward"):
            p.requires_grad_(False)
    if spec.critic_init_from_reward and not meta:
        init_critic_from_reward(model, spec.reward_model_path)
    return model, tokenizer


def worker_info(name: str, rank: int, roles: list[str]) -> dict:
    """What a worker reports at start (workers.json, and `WorkerDiedError` messages): its log is
    where a crash that kills the process (a segfault, an abort) is told, never to the driver."""
    import socket

    from align.workers.group import own_log

    return {"name": name, "rank": rank, "pid": os.getpid(), "host": socket.gethostname(), "roles": roles,
            "log": own_log()}


def build_scorer(spec: WorkerSpec):
    """The `SequenceScorer` of a reward model with a base of its own (`reward.model_path` a
    sequence classifier, see `align.models.scorer`), in the policy's dtype and device; None when
    there is no reward model or it is a reward role of the shared model."""
    if not spec.reward_model_path or reward_model_kind(spec.reward_model_path) != "classifier":
        return None
    from align.models.scorer import SequenceScorer

    m = spec.model
    return SequenceScorer(spec.reward_model_path, dtype=m.dtype, device=m.device,
                          trust_remote_code=m.trust_remote_code, batch_size=spec.forward_batch_size)


class ScorerWorker:
    """The reward group's worker in split placement when the reward model has a base of its own:
    it loads only that classifier (never the policy) and answers `annotate(batch, ("reward",))`.
    Replicas score their shards independently; the model is frozen, so `save`/`load` keep nothing."""

    def __init__(self, spec: WorkerSpec, name: str = "worker", rank: int = 0, world_size: int = 1):
        from align.models.loading import load_tokenizer

        self.spec, self.name, self.rank, self.world_size = spec, name, rank, world_size
        torch.set_num_threads(max(1, spec.num_threads))
        self.scorer = build_scorer(spec)
        if self.scorer is None:
            raise ValueError(f"ScorerWorker needs reward.model_path to be a sequence classifier, got {spec.reward_model_path!r}")
        m = spec.model
        self.tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)

    def info(self) -> dict:
        return worker_info(self.name, self.rank, ["reward"])

    def rendezvous_address(self) -> tuple[str, int]:
        return "127.0.0.1", 0  # no process group: nothing is reduced across scorer replicas

    def init_distributed(self, master_addr: str, master_port: int) -> None:
        pass

    def annotate(self, batch: Experience, roles: Sequence[str]) -> dict[str, Tensor]:
        if tuple(roles) != ("reward",):
            raise ValueError(f"the reward model's worker serves the reward role only, asked {list(roles)}")
        return {"rm_scores": self.scorer.score_batch(batch, self.tokenizer)}

    def save(self, path: str) -> None:
        pass  # frozen: reward.model_path is read again on resume

    def load(self, path: str) -> None:
        pass

    def shutdown(self) -> None:
        pass


def init_critic_from_reward(model, reward_path: Optional[str]) -> None:
    """Critic adapter := reward adapter, value head := score head (bias 0): the critic starts
    out predicting the reward model's score of every prefix."""
    if not reward_path:
        raise ValueError("critic_init_from_reward needs reward.model_path (a saved reward role)")
    if reward_model_kind(reward_path) != "role":
        raise ValueError(f"critic_init_from_reward needs reward.model_path to be a reward role on the policy's base "
                         f"(a save_role folder); {reward_path!r} is a classifier with a base of its own")
    if not getattr(model, "is_lora", False) or not hasattr(model, "peft"):
        raise ValueError("critic_init_from_reward needs model.finetune=lora (the shared multi-head model)")
    from align.models.multihead import load_lora_adapter

    load_lora_adapter(model.peft, "critic", reward_path)
    with torch.no_grad():
        model.value_head.weight.copy_(model.score_head.weight)
        model.value_head.bias.zero_()


class _StatSums:
    """Token-weighted means of per-micro-batch statistics (maxima for `*_max`), plus per-step
    values, kept as sums so the driver can combine replicas exactly."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weight = 0.0
        self.step_sums: dict[str, float] = {}
        self.steps = 0
        self.maxima: dict[str, float] = {}

    def add(self, stats: dict, weight: float) -> None:
        for k, v in stats.items():
            v = float(v)
            if k.endswith("_max"):
                self.maxima[k] = max(self.maxima.get(k, v), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v * weight
        self.weight += weight

    def add_step(self, stats: dict) -> None:
        for k, v in stats.items():
            self.step_sums[k] = self.step_sums.get(k, 0.0) + float(v)
        self.steps += 1

    def state(self) -> dict:
        return {"sums": self.sums, "weight": self.weight, "step_sums": self.step_sums, "steps": self.steps,
                "maxima": self.maxima}


def combine_stats(states: Sequence[dict], prefix: str) -> dict[str, float]:
    """Merge the replicas' `_StatSums` states into one metrics dict.

    Token-weighted statistics average over all replicas' tokens. Per-step values other than
    `grad_norm` (the loss and its parts: pg_loss, kl_loss, vf_loss) are each replica's share of
    the minibatch's value, so they add over replicas, then average over optimizer steps;
    `grad_norm` is the same on every replica (the gradients were summed), so it is read from one.
    """
    weight = sum(s["weight"] for s in states) or 1.0
    keys = {k for s in states for k in s["sums"]}
    out = {f"{prefix}/{k}": sum(s["sums"].get(k, 0.0) for s in states) / weight for k in sorted(keys)}
    for k in sorted({k for s in states for k in s["maxima"]}):
        out[f"{prefix}/{k}"] = max(s["maxima"][k] for s in states if k in s["maxima"])
    steps = max(states[0]["steps"], 1)
    for k in sorted({k for s in states for k in s["step_sums"]} - {"grad_norm"}):
        out[f"{prefix}/{k}"] = sum(s["step_sums"].get(k, 0.0) for s in states) / steps
    out[f"{prefix}/grad_norm"] = states[0]["step_sums"].get("grad_norm", 0.0) / steps
    if "lr" in states[0]:
        out[f"{prefix}/lr"] = states[0]["lr"]
    return out


def _empty_experience() -> Experience:
    z = torch.zeros(0, 1, dtype=torch.long)
    return Experience(prompt_ids=z, prompt_mask=z, response_ids=z, response_mask=z.bool(),
                      group_ids=torch.zeros(0, dtype=torch.long), rollout_logp=torch.zeros(0, 1))
