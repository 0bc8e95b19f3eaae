"""Asynchronous GRPO (rollout.mode=async): the config's refusals, the staleness filter, weights
published to a rollout worker, and end-to-end runs on a dedicated rollout group."""

from __future__ import annotations

import pytest
import torch

from align.config import ConfigError, ModelConfig, TrainerConfig, compose
from align.trainers.metrics import read_metrics
from align.trainers.rl import drop_stale
from align.workers.batch import Experience
from align.workers.worker import ActorLoss, ModelWorker, WorkerSpec
from rollout.base import SamplingParams

# Two workers on the 2-CPU session cluster: the actor group (trainer) and the rollout group.
TINY = ["algo=grpo", "cluster.placement=split", "trainer.progress=false", "rollout.max_new_tokens=12",
        "algo.rollout_batch_size=2", "algo.num_generations=4", "algo.eval_prompts=4", "algo.eval_samples=1",
        "trainer.eval_every=100", "seed=1"]


# ---- config -----------------------------------------------------------------------------------
def test_async_on_colocated_workers_is_refused_naming_the_placement():
    with pytest.raises(ConfigError, match="cluster.placement=split"):
        compose(["algo=grpo", "rollout.mode=async"])
    with pytest.raises(ConfigError, match="algo=grpo"):
        compose(["algo=ppo", "rollout.mode=async", "cluster.placement=split"])
    with pytest.raises(ConfigError, match="rollout.max_staleness"):
        compose(["algo=grpo", "rollout.mode=async", "cluster.placement=split", "rollout.max_staleness=-1"])
    with pytest.raises(ConfigError, match="rollout.partial_rollouts"):
        compose(["algo=grpo", "rollout.partial_rollouts=true"])  # sync mode
    with pytest.raises(ConfigError, match="rollout.partial_rollouts"):
        compose(["algo=grpo", "rollout=vllm", "rollout.mode=async", "cluster.placement=split",
                 "rollout.partial_rollouts=true"])
    cfg, _ = compose(["algo=grpo", "rollout.mode=async", "cluster.placement=split", "rollout.max_staleness=2"])
    assert (cfg.rollout.mode, cfg.rollout.max_staleness, cfg.cluster.num_rollout_replicas) == ("async", 2, 1)


# ---- the staleness filter ---------------------------------------------------------------------
def _rows(versions: list[int]) -> Experience:
    B = len(versions)
    return Experience(prompt_ids=torch.ones(B, 2, dtype=torch.long), prompt_mask=torch.ones(B, 2, dtype=torch.long),
                      response_ids=torch.arange(B)[:, None].repeat(1, 3), response_mask=torch.ones(B, 3, dtype=torch.bool),
                      group_ids=torch.arange(B), policy_version=torch.tensor(versions))


def test_drop_stale_keeps_rows_within_max_staleness_and_counts_the_rest():
    """Current policy version 5, k = 1: rows of versions 4 and 5 stay (lags 1, 0), rows of
    versions 3 and 2 (lags 2, 3) are dropped and counted; the lag statistics cover every row."""
    batch, stats = drop_stale(_rows([5, 3, 4, 2, 5]), version=5, max_staleness=1)
    assert batch.response_ids[:, 0].tolist() == [0, 2, 4]
    assert batch.policy_version.tolist() == [5, 4, 5]
    assert stats == {"async/lag_mean": pytest.approx((0 + 2 + 1 + 3 + 0) / 5), "async/lag_max": 3.0,
                     "async/dropped": 2.0}
    same, stats = drop_stale(_rows([2, 2]), version=2, max_staleness=0)
    assert len(same) == 2 and stats["async/dropped"] == 0 and stats["async/lag_max"] == 0
    with pytest.raises(ValueError, match="policy_version"):
        drop_stale(_rows([0]).replace(policy_version=None), version=0, max_staleness=0)


# ---- publishing weights to a rollout worker ---------------------------------------------------
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_published_weights_make_the_rollout_worker_sample_as_the_trainer(stories_path, finetune):
    """A trainer worker takes one strong update; a second worker (the rollout group's) that
    receives `actor_weights()` as version 3 samples exactly what the trainer's own engine samples
    (same seed: same tokens and log-probs), tags every row with version 3, and differs from what
    it sampled before the update."""
    from align.models.loading import load_tokenizer
    from align.trainers.rl import update_plan

    torch.manual_seed(0)
    trainer = TrainerConfig(lr=0.5 if finetune == "lora" else 0.05, optimizer="sgd", warmup_steps=0,
                            lr_scheduler="constant", max_grad_norm=1.0)
    spec = WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune=finetune), trainer=trainer)
    learner, rollout = ModelWorker(spec, name="actor-0"), ModelWorker(spec, name="rollout-0")
    tok = load_tokenizer(stories_path)
    prompts = [[1, *tok.encode(t, add_special_tokens=False)] for t in ("Once upon a time", "The sun was")]
    params = SamplingParams(n=2, max_new_tokens=12, seed=7)
    before = rollout.generate(prompts, [0, 1], params)
    assert before.policy_version is None  # an engine that follows its own actor records no version

    batch = learner.generate(prompts, [0, 1], SamplingParams(n=4, max_new_tokens=12, seed=1))
    batch = batch.replace(advantages=batch.response_mask.float())
    minibatches, normalisers = update_plan(batch, epochs=1, num_minibatches=1, agg="token-mean", max_len=12, seed=0)
    learner.update_actor(minibatches, normalisers, ActorLoss(micro_batch_size=16))
    learner.sync_rollout()

    assert rollout.set_actor_weights(learner.actor_weights(), 3) > 0
    mine, theirs = learner.generate(prompts, [0, 1], params), rollout.generate(prompts, [0, 1], params)
    assert torch.equal(mine.response_ids, theirs.response_ids)
    assert torch.allclose(mine.rollout_logp, theirs.rollout_logp, atol=1e-6)
    assert theirs.policy_version.tolist() == [3] * 4
    assert not torch.equal(before.response_ids, theirs.response_ids) or not torch.allclose(
        before.rollout_logp, theirs.rollout_logp, atol=1e-3), "the update did not change the rollouts"


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_rollout_worker_adds_the_reference_log_probs_the_trainer_would_compute(stories_path, finetune):
    """rollout.producer_reference: `generate(..., reference=True)` on a rollout worker that holds
    published (trained) weights returns the batch with `ref_logp` equal to what the trainer's own
    reference pass (`annotate`) gives for the same rows; the adapter or trained copy is not used."""
    trainer = TrainerConfig(lr=0.5 if finetune == "lora" else 0.05, optimizer="sgd", warmup_steps=0,
                            lr_scheduler="constant", max_grad_norm=1.0)
    spec = WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune=finetune), trainer=trainer)
    learner, rollout = ModelWorker(spec, name="actor-0"), ModelWorker(spec, name="rollout-0")
    moved = {k: v + 0.05 * torch.randn_like(v, generator=torch.Generator().manual_seed(0))
             for k, v in learner.actor_weights().items()}  # a policy other than the reference
    rollout.set_actor_weights(moved, 1)
    params = SamplingParams(n=3, max_new_tokens=10, seed=5)
    batch = rollout.generate([[1, 403, 407], [1, 300]], [0, 1], params, reference=True)
    expected = learner.annotate(batch.replace(ref_logp=None), ("reference",))["ref_logp"]
    assert batch.ref_logp is not None and batch.ref_logp.shape == batch.response_ids.shape
    assert torch.allclose(batch.ref_logp, expected, atol=1e-6)
    assert not torch.allclose(batch.ref_logp * batch.response_mask, batch.rollout_logp * batch.response_mask, atol=1e-3)
    assert rollout.generate([[1, 300]], [0], params).ref_logp is None


# ---- end to end on Ray --------------------------------------------------------------------------
def _run(tmp_path, name: str, *overrides: str) -> list[dict]:
    from align.trainers.grpo import train

    cfg, hydra_cfg = compose([*TINY, f"output_dir={tmp_path / name}", *overrides])
    train(cfg, hydra_cfg)
    return read_metrics(tmp_path / name)


@pytest.mark.slow
def test_async_with_max_staleness_0_reproduces_the_sync_run(ray_cluster, tmp_path):
    """k = 0: every batch waits for the previous update, so the rollout group samples from the
    same weights with the same seeds as the actor's own engine in the sync loop: identical
    rewards, losses and gradient norms at every step, lag 0, nothing dropped."""
    steps = ["trainer.max_steps=3", f"cluster.address={ray_cluster}"]
    sync = _run(tmp_path, "sync", *steps)
    asyn = _run(tmp_path, "async", *steps, "rollout.mode=async", "rollout.max_staleness=0")
    assert [r["step"] for r in asyn] == [r["step"] for r in sync] == [0, 1, 2, 3]
    for s, a in zip(sync[1:], asyn[1:]):
        for key in ("reward/mean", "actor/loss", "actor/grad_norm", "actor/kl_loss", "response_length"):
            assert a[key] == s[key], (a["step"], key)
        assert a["async/lag_max"] == 0 and a["async/dropped"] == 0
    assert asyn[-1]["actor/grad_norm"] > 0


@pytest.mark.slow
def test_async_run_with_full_fine_tuning(ray_cluster, tmp_path):
    """model.finetune=full: the whole state dict is published each step (lag 1 after the first
    batch, the run trains)."""
    rows = _run(tmp_path, "full", "trainer.max_steps=3", "model.finetune=full", "trainer.lr=1e-3",
                "rollout.mode=async", "rollout.max_staleness=1", f"cluster.address={ray_cluster}")
    assert [r["async/lag_max"] for r in rows[1:]] == [0, 1, 1]
    assert rows[1]["actor/mismatch/abs_logp_diff"] < 1e-4 < rows[3]["actor/mismatch/abs_logp_diff"]


@pytest.mark.slow
def test_async_one_step_off_policy_run_records_the_lag(ray_cluster, tmp_path):
    """k = 1: the first batch is generated by the initial policy (lag 0), every later batch one
    version behind the policy it trains (lag 1, generated while the previous update ran); none
    is dropped, each step trains its full batch, the engine's log-probs are off the trainer's
    by the lag (the rollout correction sees it), and the run evaluates and exports."""
    rows = _run(tmp_path, "k1", "trainer.max_steps=4", "trainer.eval_every=4", "rollout.mode=async",
                "rollout.max_staleness=1", f"cluster.address={ray_cluster}")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["async/lag_max"] for r in rows[1:]] == [0, 1, 1, 1]
    assert all(r["async/dropped"] == 0 and r["samples"] == 8 for r in rows[1:])
    assert rows[1]["actor/mismatch/abs_logp_diff"] < 1e-4 < rows[4]["actor/mismatch/abs_logp_diff"]
    assert "eval/reward" in rows[4]
    assert (tmp_path / "k1" / "final").exists()


@pytest.mark.slow
def test_async_resume_after_sigkill_restarts_the_queue_without_losing_or_repeating_a_batch(ray_cluster, tmp_path):
    """k = 1, checkpoints every 2 steps, the driver SIGKILLed after its first checkpoint while the
    next batch was in flight. The checkpoint keeps the data position before that batch, so the
    rerun draws those prompts again and regenerates them from the restored policy (lag 0 at the
    first resumed step, 1 after): one metrics row per step, a full batch at each, and the final
    data position is exactly max_steps batches in (a lost batch would leave it one further, a
    repeated one one behind)."""
    import json

    from _resume import _finish, _kill_after_first_checkpoint, _start, read_rows

    overrides = [*TINY, "rollout.mode=async", "rollout.max_staleness=1", "cluster.num_cpus_per_worker=0.5",
                 f"cluster.address={ray_cluster}", "trainer.max_steps=6", "trainer.save_every=2",
                 "trainer.keep_checkpoints=5"]
    out = tmp_path / "run"
    resumed_from = _kill_after_first_checkpoint(overrides, out, timeout=300)
    assert resumed_from <= 3, f"the kill came too late: the newest checkpoint is step {resumed_from}"
    saved = json.loads((out / "checkpoints" / f"step_{resumed_from}" / "trainer_state.json").read_text())
    assert saved["data"] == {"epoch": 0, "cursor": 2 * resumed_from}  # rollout_batch_size 2: the next batch is not in it
    stderr = _finish(*_start(overrides, out, "resumed"), timeout=300)
    assert f"at step {resumed_from}" in stderr

    rows = read_rows(out)
    assert sorted(rows) == list(range(7))
    assert all(rows[s]["samples"] == 8 and rows[s]["async/dropped"] == 0 for s in range(1, 7))
    assert rows[resumed_from + 1]["async/lag_max"] == 0  # regenerated by the restored policy
    assert all(rows[s]["async/lag_max"] == 1 for s in range(resumed_from + 2, 7))
    final = json.loads((out / "checkpoints" / "step_6" / "trainer_state.json").read_text())
    assert final["data"] == {"epoch": 0, "cursor": 12} and final["async_dropped"] == 0


@pytest.mark.slow
def test_async_with_two_rollout_workers(ray_cluster, tmp_path):
    """cluster.num_rollout_replicas=2 (one trainer, two rollout workers, 0.5 CPU each): the rollout
    workers are independent (no process group), each a world of one, so the default `single`
    strategy serves them and each holds the real model: the run trains full batches with the
    one-version lag."""
    rows = _run(tmp_path, "two", "trainer.max_steps=3", "rollout.mode=async", "rollout.max_staleness=1",
                "cluster.num_rollout_replicas=2", "cluster.num_cpus_per_worker=0.5", f"cluster.address={ray_cluster}")
    assert [r["async/lag_max"] for r in rows[1:]] == [0, 1, 1]
    assert all(r["samples"] == 8 and r["actor/grad_norm"] > 0 for r in rows[1:])
    assert rows[1]["actor/mismatch/abs_logp_diff"] < 1e-4  # both workers sampled from the actor's weights


@pytest.mark.slow
def test_async_with_data_parallel_trainer_replicas(ray_cluster, tmp_path):
    """Two ddp trainer replicas and one rollout worker (0.5 CPU each): rank 0 publishes the
    replicas' common weights while rank 1 takes part in the call; the run completes with the
    one-version lag after the first batch and full batches that the replicas train on."""
    rows = _run(tmp_path, "dp", "trainer.max_steps=3", "rollout.mode=async", "rollout.max_staleness=1",
                "cluster.num_replicas=2", "trainer.strategy=ddp", "cluster.num_cpus_per_worker=0.5",
                f"cluster.address={ray_cluster}")
    assert [r["async/lag_max"] for r in rows[1:]] == [0, 1, 1]
    assert all(r["samples"] == 8 and r["actor/grad_norm"] > 0 for r in rows[1:])


def test_partial_rollout_loads_weights_between_decode_steps(stories_path):
    """rollout.partial_rollouts: weights published while a generation runs (from another thread,
    as Ray's `weights` concurrency group calls it) are loaded at the next decode step: the rows'
    tokens record version 0 and then version 1 (non-decreasing, both present), each row counts
    as version 0 (its first token), and once the call returns the engine holds version 1. A
    generation asked for version 2 waits until it arrives."""
    import threading
    import time

    from align.config import RolloutConfig

    torch.manual_seed(0)
    trainer = TrainerConfig(lr=0.5, optimizer="sgd", warmup_steps=0, lr_scheduler="constant", max_grad_norm=1.0)
    spec = WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune="lora"), trainer=trainer,
                      rollout=RolloutConfig(mode="async", partial_rollouts=True))
    rollout = ModelWorker(spec, name="rollout-0")
    weights = rollout.actor_weights()
    rollout.set_actor_weights(weights, 0)
    moved = {k: v + 0.05 * torch.randn_like(v) for k, v in weights.items()}  # another policy

    seen_steps = []
    original = rollout._between_steps

    def slow_step(rows, tokens):  # a decode step long enough for the update to land mid-generation
        seen_steps.append(len(rows))
        time.sleep(0.01)
        original(rows, tokens)

    rollout._between_steps = slow_step
    params = SamplingParams(n=2, max_new_tokens=40, seed=3)
    publisher = threading.Thread(target=lambda: (time.sleep(0.1), rollout.set_actor_weights(moved, 1)))
    publisher.start()
    batch = rollout.generate([[1, 403, 407]], [0], params)
    publisher.join()
    assert rollout.policy_version == 1 and rollout._pending is None
    real = batch.response_mask
    versions = batch.token_versions
    assert batch.policy_version.tolist() == [0, 0]
    assert set(versions[real].tolist()) == {0, 1}, "the update did not land mid-generation"
    assert bool((versions[:, 1:] >= versions[:, :-1])[real[:, 1:]].all())
    # the engine generates with the published weights from then on
    assert rollout.generate([[1, 403, 407]], [0], params).policy_version.tolist() == [1, 1]

    late = threading.Thread(target=lambda: (time.sleep(0.2), rollout.set_actor_weights(weights, 2)))
    late.start()
    t0 = time.perf_counter()
    out = rollout.generate([[1, 403, 407]], [0], SamplingParams(n=1, max_new_tokens=4, seed=3), min_version=2)
    late.join()
    assert time.perf_counter() - t0 >= 0.2 and out.policy_version.tolist() == [2]


@pytest.mark.slow
def test_async_run_with_partial_rollouts(ray_cluster, tmp_path):
    """The same run with partial rollouts: weight updates go to the rollout workers' `weights`
    thread, each generation waits for the version it was queued at, so the lag stays within k
    and the rows of a batch that spans an update are counted (async/partial_frac)."""
    rows = _run(tmp_path, "partial", "trainer.max_steps=4", "rollout.mode=async", "rollout.max_staleness=1",
                "rollout.partial_rollouts=true", f"cluster.address={ray_cluster}")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["async/lag_max"] == 0 and all(r["async/lag_max"] <= 1 for r in rows[1:])
    assert all(r["async/dropped"] == 0 and r["samples"] == 8 and 0 <= r["async/partial_frac"] <= 1 for r in rows[1:])
