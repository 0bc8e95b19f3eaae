"""trainer.gradient_checkpointing in an RL worker: the actor's GRPO update (groups sharing their
prompt's pass) and the critic's PPO update step the weights exactly as without checkpointing."""

from __future__ import annotations

import pytest
import torch
from test_data_parallel import make_batch  # tests/workers is on sys.path (pytest's rootdir insertion)

from align.config import ModelConfig, TrainerConfig
from align.models.checkpointing import is_checkpointed
from align.workers.worker import ActorLoss, CriticLoss, ModelWorker, WorkerSpec


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_updates_equal_with_and_without_checkpointing(stories_path, finetune):
    torch.set_num_threads(1)
    batch = make_batch(8)
    group = torch.arange(8) // 4  # two groups of four rows sharing a prompt: the cached-prefix pass
    batch = batch.replace(prompt_ids=batch.prompt_ids[group * 4], prompt_mask=batch.prompt_mask[group * 4],
                          group_ids=group)
    after = {}
    for checkpointing in (False, True):
        trainer = TrainerConfig(lr=0.5, optimizer="sgd", warmup_steps=0, lr_scheduler="constant", max_grad_norm=0.0,
                                gradient_checkpointing=checkpointing)
        worker = ModelWorker(WorkerSpec(model=ModelConfig(name_or_path=stories_path, finetune=finetune),
                                        trainer=trainer, roles=("actor", "critic")))
        assert is_checkpointed(worker.model) == checkpointing
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():  # an actor unlike the reference: KL > 0
            for p in worker.model.trainable_parameters("actor"):
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        before = [p.detach().clone() for role in ("actor", "critic") for p in worker.model.trainable_parameters(role)]
        mb = batch.replace(**worker.annotate(batch, ("reference", "critic")))
        normaliser = float(mb.response_mask.sum())
        worker.update_actor([mb], [normaliser], ActorLoss(kl_coef=0.1, micro_batch_size=4))
        worker.update_critic([mb], [normaliser], CriticLoss(value_clip=0.2, micro_batch_size=4))
        after[checkpointing] = [p.detach().clone() for role in ("actor", "critic")
                                for p in worker.model.trainable_parameters(role)]
        moved = sum(not torch.equal(a, b) for a, b in zip(before, after[checkpointing]))
        assert moved >= len(before) // 2  # (a fresh LoRA B of zeros gives its A no gradient yet)
    for with_ckpt, without in zip(after[True], after[False]):
        torch.testing.assert_close(with_ckpt, without, rtol=1e-5, atol=1e-6)
