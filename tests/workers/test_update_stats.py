"""What the update verbs log and how they weight the rollout's tokens.

1. The logged loss parts (actor/pg_loss, actor/kl_loss, critic/vf_loss) are the minibatch's
   loss parts, whatever the micro-batching and the number of replicas: each micro-batch adds its
   share, the replicas add theirs (they were once averaged, ~16x too small at 16 micro-batches).
2. The rollout correction: with a rollout engine whose weights are deliberately perturbed, the
   update's per-token weights are exactly the capped ratios pi_old / mu, the update differs from
   the uncorrected one, and the mismatch is logged; with an exact engine the weights are 1.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_data_parallel import make_batch  # tests/workers is on sys.path (pytest's rootdir insertion)

from align.config import ModelConfig, RolloutConfig, TrainerConfig
from align.core import grpo_kl_loss, ppo_policy_loss, ppo_value_loss, rollout_correction
from align.workers.worker import ActorLoss, CriticLoss, ModelWorker, WorkerSpec, combine_stats

ROLES = ("actor", "critic")
TEMPERATURE = 0.7


def spec_for(stories_path: str, max_grad_norm: float = 1.0) -> WorkerSpec:
    """Plain SGD (a weight change is lr x the gradient, so weights compare gradients), sampling and
    scoring at temperature 0.7."""
    trainer = TrainerConfig(lr=0.5, optimizer="sgd", warmup_steps=0, lr_scheduler="constant",
                            max_grad_norm=max_grad_norm)
    return WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune="lora"), trainer=trainer, roles=ROLES,
                      rollout=RolloutConfig(temperature=TEMPERATURE))


def _trained_actor(worker: ModelWorker, seed: int = 0) -> None:
    """Draw the actor's LoRA weights, so the actor differs from the reference (KL > 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in worker.model.trainable_parameters("actor"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _minibatch(worker: ModelWorker):
    """16 rows with reference log-probs and critic values, one minibatch, its token-mean normaliser."""
    batch = make_batch(16)
    batch = batch.replace(**worker.annotate(batch, ("reference", "critic")))
    return batch, float(batch.response_mask.sum())


LOSS = ActorLoss(clip_eps_low=0.2, clip_eps_high=0.28, kl_coef=0.1, kl_kind="k3")
CRITIC = CriticLoss(value_clip=0.2)


@torch.no_grad()
def one_pass_parts(worker: ModelWorker, mb, normaliser: float) -> dict[str, float]:
    """The minibatch's loss parts computed in one pass over all 16 rows with the current weights."""
    mask = mb.response_mask
    logp = worker.model.response_log_probs(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mask,
                                           temperature=TEMPERATURE)
    pg, _ = ppo_policy_loss(logp, logp, mb.advantages, mask, 0.2, 0.28, None, "token-mean", normaliser)
    kl, _ = grpo_kl_loss(logp, mb.ref_logp, mask, "k3", agg="token-mean", normaliser=normaliser)
    values = worker.model.values(mb.input_ids, mb.attention_mask)[:, mb.response_slice]
    vf, _ = ppo_value_loss(values, mb.values, mb.returns, mask, 0.2, "token-mean", normaliser)
    return {"actor/pg_loss": float(pg), "actor/kl_loss": float(kl), "critic/vf_loss": float(vf),
            "actor/loss": float(pg + 0.1 * kl), "critic/loss": float(vf)}


def test_logged_loss_parts_equal_a_one_pass_recomputation_at_any_micro_batching(stories_path):
    """16 rows as 1, 4 or 16 micro-batches: actor/pg_loss, actor/kl_loss and critic/vf_loss equal
    the one-pass values of the whole minibatch (before the step) to float rounding."""
    torch.set_num_threads(1)
    worker = ModelWorker(spec_for(stories_path))
    _trained_actor(worker)
    initial = {r: worker.trainable_state(r) for r in ROLES}
    mb, normaliser = _minibatch(worker)
    expected = one_pass_parts(worker, mb, normaliser)
    assert expected["actor/kl_loss"] > 1e-4 and abs(expected["actor/pg_loss"]) > 1e-3
    for micro in (16, 4, 1):
        for role in ROLES:  # every run starts from the same weights (SGD keeps no state)
            with torch.no_grad():
                for p, v in zip(worker.model.trainable_parameters(role), initial[role]):
                    p.copy_(v)
        actor = worker.update_actor([mb], [normaliser], replace(LOSS, micro_batch_size=micro))
        critic = worker.update_critic([mb], [normaliser], CriticLoss(value_clip=0.2, micro_batch_size=micro))
        logged = {**combine_stats([actor], "actor"), **combine_stats([critic], "critic")}
        for key, value in expected.items():
            assert logged[key] == pytest.approx(value, rel=1e-4, abs=1e-7), (micro, key)


@pytest.mark.slow
def test_logged_loss_parts_add_over_two_replicas(ray_cluster, stories_path, tmp_path):
    """Two gloo replicas, 8 rows each, 2 micro-batches of 4: the merged metrics are the one-pass
    values of the whole 16-row minibatch."""
    from align.trainers.rl import dispatch_updates
    from align.workers.group import WorkerGroup

    torch.set_num_threads(1)
    spec = spec_for(stories_path)
    local = ModelWorker(spec)
    _trained_actor(local)
    local.save(str(tmp_path / "start"))
    mb, normaliser = _minibatch(local)
    expected = one_pass_parts(local, mb, normaliser)

    # fsdp2: the unsharded checkpoint loads into the shards, and the parts are still the step's
    sharded = replace(spec, trainer=replace(spec.trainer, strategy="fsdp2"))
    two = WorkerGroup("stats-two", sharded, num_replicas=2, run_id="test-stats")
    try:
        two.call("load", str(tmp_path / "start"))
        metrics = dispatch_updates({"actor": (two, replace(LOSS, micro_batch_size=4)),
                                    "critic": (two, CriticLoss(value_clip=0.2, micro_batch_size=4))},
                                   [mb], [normaliser])
    finally:
        two.kill()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-7), key


# ---------------------------------------------------------------- rollout correction


def _rollout(worker: ModelWorker, seed: int = 0):
    from rollout.base import SamplingParams

    prompts = [[1, 403, 261, 119][: 2 + i % 3] for i in range(6)]  # stories260K: vocab 512
    batch = worker.generate(prompts, list(range(6)), SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=10,
                                                                     seed=seed))
    torch.manual_seed(seed)
    advantages = torch.randn(len(batch), 1) * batch.response_mask
    return batch.replace(advantages=advantages)


def _update_delta(worker: ModelWorker, batch, loss: ActorLoss):
    """Run one actor step from the current weights and restore them; returns (SGD step / -lr, stats)."""
    before = worker.trainable_state("actor")
    stats = worker.update_actor([batch], [float(batch.response_mask.sum())], loss)
    after = worker.trainable_state("actor")
    with torch.no_grad():
        for p, v in zip(worker.model.trainable_parameters("actor"), before):
            p.copy_(v)
    return [(a - b) / -0.5 for a, b in zip(after, before)], combine_stats([stats], "actor")


def test_perturbed_engine_weights_are_the_capped_ratios_and_change_the_update(stories_path):
    """The merged rollout copy (the HF engine's model) gets noise in its weights, so mu != pi_old.
    TIS (cap 1.5): the logged mean weight is the mean of min(pi_old / mu, 1.5) over the tokens, some
    tokens are capped, and the gradient equals that of the loss with those weights (computed here
    from the formula); without correction the gradient is the unweighted one and differs."""
    torch.set_num_threads(1)
    worker = ModelWorker(spec_for(stories_path, max_grad_norm=0.0))
    _trained_actor(worker)
    worker.sync_rollout()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in worker.rollout_model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.abs().mean())
    batch = _rollout(worker)
    mask, normaliser = batch.response_mask, float(batch.response_mask.sum())
    old = worker.annotate(batch, ("actor",))["old_logp"]
    weights, _ = rollout_correction(old, batch.rollout_logp, mask, "tis", "token", 1.5)
    assert (weights[mask] != 1).all() and (weights[mask] == 1.5).any(), "the perturbation should move every ratio"

    def expected_grad(w):
        worker.model.train()
        logp = worker.model.response_log_probs(batch.prompt_ids, batch.prompt_mask, batch.response_ids, mask,
                                               temperature=TEMPERATURE)
        loss, _ = ppo_policy_loss(logp, logp.detach(), batch.advantages, mask, normaliser=normaliser, weights=w)
        return torch.autograd.grad(loss, worker.model.trainable_parameters("actor"))

    tis, stats = _update_delta(worker, batch, ActorLoss(rollout_correction="tis", correction_cap=1.5,
                                                       micro_batch_size=4))
    plain, plain_stats = _update_delta(worker, batch, ActorLoss(rollout_correction="none", micro_batch_size=4))
    for got, want in zip(tis, expected_grad(weights)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    for got, want in zip(plain, expected_grad(None)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    assert max(float((a - b).abs().max()) for a, b in zip(tis, plain)) > 1e-4
    assert stats["actor/mismatch/weight_mean"] == pytest.approx(float(weights[mask].mean()), rel=1e-4)
    assert stats["actor/mismatch/corrected_frac"] == pytest.approx(float((weights[mask] == 1.5).float().mean()))
    assert stats["actor/mismatch/abs_logp_diff"] > 1e-2
    # the mismatch is measured without correction too
    assert plain_stats["actor/mismatch/abs_logp_diff"] == pytest.approx(stats["actor/mismatch/abs_logp_diff"])


def test_exact_engine_gives_weights_of_one(stories_path):
    """The unperturbed merged fp32 copy samples as the actor scores: the mismatch is float rounding,
    the weights are 1, and the corrected update equals the uncorrected one."""
    torch.set_num_threads(1)
    worker = ModelWorker(spec_for(stories_path, max_grad_norm=0.0))
    _trained_actor(worker)
    worker.sync_rollout()
    batch = _rollout(worker, seed=3)
    for mode in ("tis", "mis"):
        corrected, stats = _update_delta(worker, batch, ActorLoss(rollout_correction=mode, micro_batch_size=4))
        assert stats["actor/mismatch/abs_logp_diff"] < 1e-5
        assert stats["actor/mismatch/weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert stats["actor/mismatch/corrected_frac"] == 0
    plain, _ = _update_delta(worker, batch, ActorLoss(rollout_correction="none", micro_batch_size=4))
    for a, b in zip(corrected, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
