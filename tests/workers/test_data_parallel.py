"""Data parallelism: N replicas joined by gloo take the same optimizer steps as one replica on
the whole batch; gradient accumulation in micro-batches equals one big batch."""

from __future__ import annotations

import pytest
import torch

from align.config import ModelConfig, TrainerConfig
from align.workers.batch import Experience
from align.workers.worker import ActorLoss, CriticLoss, ModelWorker, WorkerSpec

ROLES = ("actor", "critic")


def make_batch(B: int = 16, seed: int = 0) -> Experience:
    """B rows of random stories260K tokens: prompts of 3..6 tokens (left-padded), responses of
    2..9 tokens (right-padded), random advantages and returns."""
    g = torch.Generator().manual_seed(seed)
    P, R = 6, 9
    p_len = torch.randint(3, P + 1, (B,), generator=g)
    r_len = torch.randint(2, R + 1, (B,), generator=g)
    prompt_mask = (torch.arange(P)[None, :] >= P - p_len[:, None]).long()
    response_mask = torch.arange(R)[None, :] < r_len[:, None]
    prompt_ids = torch.randint(3, 512, (B, P), generator=g) * prompt_mask
    response_ids = torch.randint(3, 512, (B, R), generator=g) * response_mask
    return Experience(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        group_ids=torch.arange(B) // 4,
        advantages=torch.randn(B, R, generator=g) * response_mask,
        returns=torch.randn(B, R, generator=g) * response_mask,
    )


def spec_for(stories_path: str, strategy: str = "single", finetune: str = "lora") -> WorkerSpec:
    """Plain SGD: a weight change is lr x the (clipped) gradient, so comparing weights compares
    gradients. (Adam's first step is ~lr x sign(g) whatever the gradient's scale, which would
    hide a wrong loss normaliser.)"""
    trainer = TrainerConfig(lr=0.5, optimizer="sgd", warmup_steps=0, lr_scheduler="constant", max_grad_norm=1.0,
                            strategy=strategy)
    return WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune=finetune), trainer=trainer, roles=ROLES)


def losses(micro: int) -> dict:
    return {"actor": ActorLoss(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1, micro_batch_size=micro),
            "critic": CriticLoss(value_clip=0.2, micro_batch_size=micro)}


@pytest.mark.slow
@pytest.mark.parametrize("strategy,finetune", [("ddp", "lora"), ("fsdp2", "lora"), ("fsdp2", "full")])
def test_two_replicas_take_the_same_steps_as_one_on_the_whole_batch(ray_cluster, stories_path, strategy, finetune):
    """2 epochs x 2 minibatches of 8 rows with actor (clipped loss + k3 KL) and critic updates.
    One replica runs each minibatch as 2 micro-batches of 4; two replicas (gloo; whole copies
    under ddp, sharded under fsdp2) run 4 rows each and sum gradients. Both replicas must end
    bitwise equal to each other and equal (to float rounding) to the single replica; the weights
    must have moved. The reference/old log-probs and values of the no-grad pass are compared too."""
    from align.trainers.rl import dispatch_updates, update_plan
    from align.workers.group import Placement, WorkerGroup

    spec = spec_for(stories_path, finetune=finetune)
    one = WorkerGroup("dp-one", spec, num_replicas=1, run_id="test-dp")
    try:
        initial = {r: one.call("trainable_state", r)[0] for r in ROLES}
        batch = Placement({"actor": one, "critic": one}).annotate(make_batch(), ("reference", "actor", "critic"))
        minibatches, normalisers = update_plan(batch, epochs=2, num_minibatches=2, agg="token-mean", max_len=9, seed=3)
        metrics_one = dispatch_updates({r: (one, losses(4)[r]) for r in ROLES}, minibatches, normalisers)
        after_one = {r: one.call("trainable_state", r)[0] for r in ROLES}
    finally:
        one.kill()

    two = WorkerGroup("dp-two", spec_for(stories_path, strategy, finetune), num_replicas=2, run_id="test-dp")
    try:
        again = Placement({"actor": two, "critic": two}).annotate(make_batch(), ("reference", "actor", "critic"))
        mask = batch.response_mask.float()  # positions past a response's end are padding
        for field in ("ref_logp", "old_logp", "values"):
            torch.testing.assert_close(getattr(again, field) * mask, getattr(batch, field) * mask, rtol=0, atol=1e-5)
        metrics_two = dispatch_updates({r: (two, losses(4)[r]) for r in ROLES}, minibatches, normalisers)
        after_two = {r: two.call("trainable_state", r) for r in ROLES}
    finally:
        two.kill()

    for role in ROLES:
        rank0, rank1 = after_two[role]
        assert all(torch.equal(a, b) for a, b in zip(rank0, rank1)), f"{role}: replicas diverged"
        moved = max(float((a - b).abs().max()) for a, b in zip(after_one[role], initial[role]))
        assert moved > 1e-3, f"{role}: the update did not move the weights"
        for a, b in zip(after_one[role], rank0):  # full weights (|w| ~ 0.1-1) carry more rounding than LoRA's
            torch.testing.assert_close(b, a, atol=1e-6 if finetune == "lora" else 1e-5, rtol=1e-5)
    for key in ("actor/loss", "actor/grad_norm", "critic/loss", "critic/grad_norm", "actor/clipfrac"):
        assert metrics_two[key] == pytest.approx(metrics_one[key], rel=1e-4, abs=1e-6), key
    assert metrics_one["actor/clipfrac"] > 0  # the second epoch is off-policy: the clip is exercised


def test_micro_batches_accumulate_to_the_full_batch_gradient(stories_path):
    """In one worker, a minibatch of 16 rows run as 4 micro-batches of 4 takes the same optimizer
    step as one micro-batch of 16 (the loss normaliser is the minibatch's, not the micro-batch's)."""
    from align.trainers.rl import update_plan

    torch.set_num_threads(1)
    spec = spec_for(stories_path)
    states = []
    for micro in (4, 16):
        worker = ModelWorker(spec)
        batch = make_batch()
        batch = batch.replace(**worker.annotate(batch, ("reference", "actor", "critic")))
        minibatches, normalisers = update_plan(batch, epochs=1, num_minibatches=1, agg="seq-mean-token-mean",
                                               max_len=9, seed=0)
        worker.update_actor(minibatches, normalisers, losses(micro)["actor"])
        worker.update_critic(minibatches, normalisers, losses(micro)["critic"])
        states.append({r: worker.trainable_state(r) for r in ROLES})
    for role in ROLES:
        for a, b in zip(states[0][role], states[1][role]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
