"""Activation checkpointing (align/models/checkpointing.py): the same gradients as without it on
every training path, the KV-cached ones included, and layers really replayed in the backward."""

from __future__ import annotations

import copy

import pytest
import torch

from align.models.checkpointing import enable_activation_checkpointing, is_checkpointed


def tiny_lm(seed: int = 0, dropout: float = 0.0):
    """A random 3-layer Llama (grouped-query attention, so the cache's kv heads differ from the heads)."""
    from align.models import build_tiny_llama

    model = build_tiny_llama(seed=seed, vocab_size=512, hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    model.config.attention_dropout = dropout
    return model.train()


def lora(model, r: int = 4, dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero: make the adapter matter to the forward
        for name, p in peft.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft.train()


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert out, "no gradient reached the model"
    return out


def assert_same_grads(with_ckpt, without):
    assert with_ckpt.keys() == without.keys()
    for n, g in without.items():
        torch.testing.assert_close(with_ckpt[n], g, rtol=1e-5, atol=1e-5 * max(g.abs().max().item(), 1e-8), msg=n)


def both_ways(build, loss_fn):
    """Gradients of `loss_fn(model)` on two identical models, the second checkpointed."""
    out = []
    for checkpointed in (False, True):
        model = build()
        if checkpointed:
            assert enable_activation_checkpointing(model) >= 3  # 3 per causal LM
        torch.manual_seed(0)  # dropout masks: the same draws both ways
        loss_fn(model).backward()
        out.append(grads(model))
    return out


def rows(B: int = 4, T: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (B, T), generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([T, T - 3, 5, T - 1][:B])[:, None]).long()
    return ids * mask, mask


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_sft_path_same_gradients(finetune):
    """SFT's token NLL (the decoder without a cache, the LM head in chunks)."""
    from align.trainers.sft import SFTBatch, token_nll

    ids, mask = rows()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    batch = SFTBatch(input_ids=ids, attention_mask=mask, labels=labels)

    def build():
        return lora(tiny_lm(), dropout=0.1) if finetune == "lora" else tiny_lm()

    def loss(model):
        nll, m = token_nll(model, batch)
        return (nll * m).sum() / m.sum()

    assert_same_grads(*reversed(both_ways(build, loss)))


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_dpo_cached_prefix_same_gradients(finetune):
    """DPO's shared prompt: the prompt pass fills a KV cache, both responses run over it with the
    gradient flowing back through the cached keys and values. Checkpointed, the replay must not
    write the cache again, and the result must still match the concatenated pass."""
    from align.trainers.logps import collate_shared, concatenated_logps, shared_prompt_logps

    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (7, 3, 5)]
    responses = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (4, 6, 2, 5, 6, 1)]
    batch = collate_shared(prompts, responses, pad_id=0)

    def build():
        return lora(tiny_lm()) if finetune == "lora" else tiny_lm()

    def loss(fn):
        return lambda model: (fn(model, **batch, k=2)[0] * torch.linspace(0.5, 1.5, 6)).sum()

    without, with_ckpt = both_ways(build, loss(shared_prompt_logps))
    assert_same_grads(with_ckpt, without)
    concatenated, _ = both_ways(build, loss(concatenated_logps))
    for n, gr in concatenated.items():  # and still the concatenated pass's gradients (float rounding apart)
        torch.testing.assert_close(with_ckpt[n], gr, rtol=1e-4, atol=1e-5 * gr.abs().max().item(), msg=n)


def grouped(G: int = 3):
    """Left-padded prompts, each repeated G times (a GRPO group), right-padded responses."""
    prompts = [[1, 40, 7, 99, 5, 300], [1, 0, 88], [1, 250]]
    P, R = 6, 5
    prompt_ids = torch.zeros(3 * G, P, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i in range(3 * G):
        p = prompts[i % 3]
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
    g = torch.Generator().manual_seed(0)
    response_mask = (torch.arange(R)[None] < torch.randint(1, R + 1, (3 * G,), generator=g)[:, None]).long()
    response_ids = torch.randint(3, 512, (3 * G, R), generator=g) * response_mask
    return prompt_ids, prompt_mask, response_ids, response_mask


def multihead():
    from align.models.multihead import MultiHeadModel, RoleConfig

    model = MultiHeadModel(tiny_lm(), {"actor": RoleConfig(r=4), "critic": RoleConfig(r=4)})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.train()


def separate():
    from align.models.separate import SeparateModels

    return SeparateModels({"actor": tiny_lm(), "critic": tiny_lm(seed=1)}, reference=tiny_lm()).train()


@pytest.mark.parametrize("build", [multihead, separate], ids=["lora-multihead", "full-separate"])
def test_grpo_shared_prompt_and_critic_same_gradients(build):
    """The RL update's passes: the actor's response log-probs with one prompt pass per group (its
    cache gathered per row), then the critic's values (PPO) on the same shared base, switching the
    LoRA adapter, and one backward for both. The replay must run each layer under the adapter it
    first ran with, not the one active at backward time."""
    prompt_ids, prompt_mask, response_ids, response_mask = grouped()
    ids, mask = torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1)
    weights = torch.linspace(-1, 1, response_ids.numel()).view_as(response_ids)

    def loss(model):
        logp = model.response_log_probs(prompt_ids, prompt_mask, response_ids, response_mask, role="actor")
        values = model.values(ids, mask)
        return (logp * weights * response_mask).sum() + (values * mask).pow(2).sum()

    without, with_ckpt = both_ways(build, loss)
    assert_same_grads(with_ckpt, without)
    assert any(".critic." in n or n.startswith("models.critic") for n in with_ckpt)
    assert any(".actor." in n or n.startswith("models.actor") for n in with_ckpt)


def test_checkpointing_replays_layers_and_saves_less():
    """Checkpointed, every layer runs twice per forward + backward (the replay) and autograd keeps
    a fraction of the tensors outside the checkpoints."""
    ids, mask = rows(T=32)

    def run(model):
        calls = []
        for layer in model.model.layers:
            layer.mlp.register_forward_pre_hook(lambda m, a: calls.append(m))
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        after_forward = len(calls)
        hidden.pow(2).mean().backward()
        return after_forward, len(calls), sum(saved)

    plain = tiny_lm()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    assert is_checkpointed(checkpointed) and not is_checkpointed(plain)
    assert run(plain)[:2] == (3, 3)
    fwd, total, saved = run(checkpointed)
    assert (fwd, total) == (3, 6)
    assert saved < 0.2 * run(tiny_lm())[2]
    with torch.no_grad():  # no gradient: no checkpoint, no replay
        before = [p.detach().clone() for p in checkpointed.parameters()]
        checkpointed.model(input_ids=ids, attention_mask=mask)
    assert all(torch.equal(a, b) for a, b in zip(before, checkpointed.parameters()))


def test_generation_with_cache_unchanged_and_idempotent():
    """Without gradients a checkpointed model generates as before (its cache untouched), and
    enabling twice wraps once."""
    plain = tiny_lm().eval()
    checkpointed = copy.deepcopy(plain)
    enable_activation_checkpointing(checkpointed)
    forward = checkpointed.model.layers[0].forward
    enable_activation_checkpointing(checkpointed)
    assert checkpointed.model.layers[0].forward is forward
    ids = torch.tensor([[1, 40, 7, 99]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(plain.generate(ids, **kw), checkpointed.generate(ids, **kw))


def test_refuses_hugging_face_checkpointing_and_non_hf_models():
    """HF's own checkpointing drops the KV cache in training (transformers 5's
    GradientCheckpointingLayer): combining the two is refused, and so is a model without HF layers."""
    model = tiny_lm()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient_checkpointing_disable"):
        enable_activation_checkpointing(model)
    with pytest.raises(ValueError, match="no Hugging Face decoder layers"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_engine_prepare_applies_the_knob():
    from align.config import ConfigError, TrainerConfig
    from align.engine import TrainEngine

    assert TrainerConfig().gradient_checkpointing is False
    with pytest.raises(ConfigError, match="trainer.gradient_checkpointing"):
        TrainerConfig(gradient_checkpointing="yes")
    model = tiny_lm()
    TrainEngine("fp32", "cpu").prepare(model)
    assert not is_checkpointed(model)
    TrainEngine("fp32", "cpu", activation_checkpointing=True).prepare(model)
    assert is_checkpointed(model)
