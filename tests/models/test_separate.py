"""Full fine-tuning: one model per role behind the same verbs as the shared model."""

from __future__ import annotations

import pytest
import torch

from align.core.logprobs import logprobs_from_logits
from align.models import load_causal_lm
from align.models.multihead import MultiHeadModel, RoleConfig
from align.models.separate import SeparateModels


@pytest.fixture
def separate(stories_base):
    torch.manual_seed(0)
    return SeparateModels.from_base(stories_base, pad_token_id=0)


def test_every_role_holds_its_own_weights_and_the_reference_is_frozen(separate):
    weights = {role: separate._causal_lm(role).get_input_embeddings().weight for role in separate.served_roles}
    assert len({w.data_ptr() for w in weights.values()}) == 4
    assert not any(p.requires_grad for p in separate.reference.parameters())
    actor_params = separate.trainable_parameters("actor")
    assert sum(p.numel() for p in actor_params) == sum(p.numel() for p in separate.models["actor"].parameters())
    separate.train()
    assert not separate.reference.training and separate.models["actor"].training


def test_a_full_actor_step_leaves_reference_critic_and_reward_untouched(separate, batch):
    ids, mask = batch
    before = {k: v.clone() for k, v in separate.state_dict().items()}
    with torch.no_grad():
        ref_before = separate.log_probs(ids, mask, role="reference")
    loss = -separate.log_probs(ids, mask, role="actor")[mask[:, 1:].bool()].mean()
    loss.backward()
    torch.optim.SGD(separate.trainable_parameters("actor"), lr=0.1).step()
    after = separate.state_dict()
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"models.actor"}
    with torch.no_grad():
        assert torch.equal(separate.log_probs(ids, mask, role="reference"), ref_before)
        assert not torch.allclose(separate.log_probs(ids, mask, role="actor"), ref_before)


def test_same_verbs_same_numbers_as_the_shared_model_at_initialisation(separate, stories_path, batch):
    """Both layouts start from the same base: with the LoRA B matrices at zero, every role of the
    shared model computes the base function, as every copy does; heads are seeded alike."""
    ids, mask = batch
    torch.manual_seed(0)
    shared = MultiHeadModel(load_causal_lm(stories_path).eval(), {r: RoleConfig(r=2) for r in separate.roles})
    shared.value_head.load_state_dict(separate.value_head.state_dict())
    shared.score_head.load_state_dict(separate.score_head.state_dict())
    with torch.no_grad():
        for mode in ("mixed", "separate"):
            a = shared.multi_role_forward(ids, mask, roles=("reference", "actor", "critic", "reward"), mode=mode)
            b = separate.multi_role_forward(ids, mask, roles=("reference", "actor", "critic", "reward"))
            for role in a:
                torch.testing.assert_close(a[role], b[role], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multi-role mode"):
        separate.multi_role_forward(ids, mask, mode="mixed")


def test_save_load_export_and_sync_of_full_models(separate, batch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    ids, mask = batch
    with torch.no_grad():  # move the roles away from the base so a no-op load would show
        for role in separate.roles:
            for p in separate.models[role].parameters():
                p.add_(torch.randn_like(p) * 0.01)
    separate.save(str(tmp_path / "ckpt"))
    fresh = SeparateModels.from_base(load_causal_lm(str(tmp_path / "ckpt" / "actor")).eval(), pad_token_id=0)
    fresh.load(str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(fresh.values(ids, mask), separate.values(ids, mask), atol=0, rtol=0)
        torch.testing.assert_close(fresh.scores(ids, mask), separate.scores(ids, mask), atol=0, rtol=0)

    separate.export_merged_actor(str(tmp_path / "actor"))
    actor = AutoModelForCausalLM.from_pretrained(str(tmp_path / "actor")).eval()
    separate.export_reward_model(str(tmp_path / "rm"))
    clf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "rm")).eval()
    with torch.no_grad():
        logits = actor(input_ids=ids, attention_mask=mask).logits
        real = mask[:, 1:].bool()
        expected = separate.log_probs(ids, mask)
        assert torch.equal(logprobs_from_logits(logits[:, :-1], ids[:, 1:])[real], expected[real])
        torch.testing.assert_close(clf(input_ids=ids, attention_mask=mask).logits.squeeze(-1),
                                   separate.scores(ids, mask), atol=1e-6, rtol=0)

    sync = separate.sync_state_dict("actor")
    assert set(sync) == set(load_causal_lm(str(tmp_path / "actor")).state_dict())
    assert not separate.is_lora


def test_lora_on_copies_trains_only_adapters(stories_base, batch):
    """OpenRLHF's LoRA layout (a base per role) behind the same verbs: the memory benchmark's baseline."""
    ids, mask = batch
    models = SeparateModels.from_base(stories_base, roles=("actor", "critic"), lora=RoleConfig(r=2))
    assert models.is_lora and models.roles == ("actor", "critic")
    names = [n for n, p in models.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or n.startswith("value_head") for n in names)
    loss = models.values(ids, mask).pow(2).mean()
    loss.backward()
    assert all(p.grad is None for p in models.trainable_parameters("actor"))
    assert all(p.grad is not None for p in models.trainable_parameters("critic"))
    assert all("lora_" in k for k in models.sync_state_dict("actor"))
