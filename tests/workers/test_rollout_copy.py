"""The worker's rollout engine with `merged_rollout`: a plain copy of the base with the actor's
LoRA merged in, which must follow the actor through updates (sync_rollout) and checkpoints."""

from __future__ import annotations

import pytest
import torch

from align.config import ModelConfig, TrainerConfig
from align.workers.worker import ActorLoss, ModelWorker, WorkerSpec
from rollout.base import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def _spec(stories_path: str, merged: bool, finetune: str = "lora") -> WorkerSpec:
    trainer = TrainerConfig(lr=0.5, optimizer="sgd", warmup_steps=0, lr_scheduler="constant", max_grad_norm=1.0)
    return WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune=finetune), trainer=trainer,
                      roles=("actor",), merged_rollout=merged)


def _update(worker: ModelWorker, prompts) -> None:
    """One strong SGD step that raises the log-prob of one sampled batch."""
    from align.trainers.rl import update_plan

    batch = worker.generate(prompts, list(range(len(prompts))), SamplingParams(n=2, max_new_tokens=12, seed=1))
    batch = batch.replace(advantages=batch.response_mask.float())
    minibatches, normalisers = update_plan(batch, epochs=1, num_minibatches=1, agg="token-mean", max_len=12, seed=0)
    worker.update_actor(minibatches, normalisers, ActorLoss(micro_batch_size=16))


def _actor_logp(worker: ModelWorker, batch) -> torch.Tensor:
    with torch.no_grad():
        return worker.model.log_probs(batch.input_ids, batch.attention_mask, role="actor")[:, batch.response_slice]


@pytest.fixture
def prompts(stories_path):
    from align.models.loading import load_tokenizer

    tok = load_tokenizer(stories_path)
    return [[1, *tok.encode(t, add_special_tokens=False)] for t in ("Once upon a time", "Tom had a big red", "The sun was")]


def test_merged_copy_generates_what_the_actor_would_and_follows_each_sync(stories_path, prompts, tmp_path):
    torch.manual_seed(0)
    torch.set_num_threads(1)
    merged, shared = ModelWorker(_spec(stories_path, True)), ModelWorker(_spec(stories_path, False))
    assert merged.rollout_model is not None and shared.rollout_model is None
    assert merged.engine.model is merged.rollout_model and merged.engine.role is None
    for w in (merged, shared):
        torch.manual_seed(0)
        _update(w, prompts)
    stale = merged.generate(prompts, [0, 1, 2], GREEDY)
    assert merged.sync_rollout() > 0 and shared.sync_rollout() == 0
    fresh = merged.generate(prompts, [0, 1, 2], GREEDY)
    # Same update on both workers: the merged copy now decodes as the adapter does.
    assert torch.equal(fresh.response_ids, shared.generate(prompts, [0, 1, 2], GREEDY).response_ids)
    assert not torch.equal(stale.response_ids, fresh.response_ids), "the update did not change the greedy story"
    real = fresh.response_mask
    assert (fresh.rollout_logp - _actor_logp(merged, fresh))[real].abs().max() < 1e-4
    assert (stale.rollout_logp - _actor_logp(merged, stale))[real].abs().max() > 1e-3

    # A checkpoint restores the copy too: a new worker that loads it decodes the same.
    merged.save(str(tmp_path))
    restored = ModelWorker(_spec(stories_path, True))
    restored.load(str(tmp_path))
    assert torch.equal(restored.generate(prompts, [0, 1, 2], GREEDY).response_ids, fresh.response_ids)


def test_an_unsharded_full_fine_tune_generates_on_the_actor_itself(stories_path, prompts):
    """Full fine-tuning keeps no rollout copy unless the actor is sharded (fsdp2 replicas,
    tests/trainers/rl/test_rl_fsdp2.py): the engine samples from the live actor, so an update
    shows in the next rollout with nothing to sync, and the CPU smoke path holds one actor."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    worker = ModelWorker(_spec(stories_path, True, finetune="full"))
    assert worker.rollout_model is None and worker.engine.model is worker.model
    before = worker.generate(prompts, [0, 1, 2], GREEDY)
    _update(worker, prompts)
    assert worker.sync_rollout() == 0
    after = worker.generate(prompts, [0, 1, 2], GREEDY)
    assert not torch.equal(before.response_ids, after.response_ids), "the update did not change the greedy story"
    assert (after.rollout_logp - _actor_logp(worker, after))[after.response_mask].abs().max() < 1e-4


def test_entropy_bonus_raises_the_policys_entropy_and_is_off_by_default(stories_path, prompts):
    """With zero advantages and no KL term the policy loss has no gradient: a step with
    entropy_coef 0 leaves the actor as it was; with entropy_coef > 0 the same step raises the
    policy's mean entropy on the batch, and the update reports it."""
    from align.core.masked import masked_mean
    from align.trainers.rl import update_plan
    from align.workers.worker import combine_stats

    torch.manual_seed(0)
    torch.set_num_threads(1)
    worker = ModelWorker(_spec(stories_path, False))
    batch = worker.generate(prompts, [0, 1, 2], SamplingParams(n=2, max_new_tokens=12, seed=1))
    batch = batch.replace(advantages=torch.zeros(batch.response_ids.shape))
    minibatches, normalisers = update_plan(batch, epochs=1, num_minibatches=1, agg="token-mean", max_len=12, seed=0)

    def mean_entropy() -> float:
        with torch.no_grad():
            _, entropy = worker.model.response_log_probs(batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                                         batch.response_mask, entropy=True)
        return float(masked_mean(entropy, batch.response_mask))

    before, weights = mean_entropy(), worker.trainable_state("actor")
    stats = combine_stats([worker.update_actor(minibatches, normalisers, ActorLoss(micro_batch_size=16))], "actor")
    assert "actor/entropy" not in stats
    assert all(torch.equal(a, b) for a, b in zip(weights, worker.trainable_state("actor")))
    stats = combine_stats([worker.update_actor(minibatches, normalisers, ActorLoss(entropy_coef=1.0,
                                                                                   micro_batch_size=16))], "actor")
    assert stats["actor/entropy"] == pytest.approx(before, rel=1e-4)
    assert mean_entropy() > before + 0.05, (before, mean_entropy())
