"""HFEngine.update_weights (full state dict, LoRA tensors), sleep / wake_up, and generation from
the shared multi-head model's actor role without a copy of its weights."""

from __future__ import annotations

import pytest
import torch

from align.models import build_tiny_llama
from rollout import HFEngine, SamplingParams

GREEDY = SamplingParams(temperature=0, max_new_tokens=16)


def tokens(out):
    return [s.token_ids for s in out.samples]


def pointers(module):
    return {name: p.data_ptr() for name, p in module.state_dict(keep_vars=True).items()}


def test_update_weights_with_a_full_state_dict(tiny, stories, prompts):
    _, tok = stories
    original = {k: v.clone() for k, v in tiny.state_dict().items()}
    other = build_tiny_llama(seed=1, hidden_size=64, num_layers=2, num_heads=2)
    engine = HFEngine(tiny, tok, eos_token_id=[])
    before, ptrs = engine.generate(prompts, GREEDY), pointers(tiny)

    engine.update_weights(state_dict=other.state_dict())
    after = engine.generate(prompts, GREEDY)
    assert tokens(after) != tokens(before)
    assert tokens(after) == tokens(HFEngine(other, tok, eos_token_id=[]).generate(prompts, GREEDY))
    assert pointers(tiny) == ptrs, "weights are loaded in place"

    engine.update_weights(state_dict=original)
    restored = engine.generate(prompts, GREEDY)
    assert tokens(restored) == tokens(before)
    assert [s.logprobs for s in restored.samples] == [s.logprobs for s in before.samples]

    with pytest.raises(KeyError, match="not in the model"):
        engine.update_weights(state_dict={"no.such.weight": torch.zeros(1)})
    with pytest.raises(TypeError, match="peft"):
        engine.update_weights(lora={})
    with pytest.raises(ValueError):
        engine.update_weights()


def test_update_weights_with_lora_tensors(tiny, stories, prompts):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    _, tok = stories
    base_out = HFEngine(tiny, tok, eos_token_id=[]).generate(prompts, GREEDY)
    model = get_peft_model(tiny, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    engine = HFEngine(model, tok, eos_token_id=[])
    zero = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}  # lora_B = 0: the base model
    assert tokens(engine.generate(prompts, GREEDY)) == tokens(base_out)

    g = torch.Generator().manual_seed(0)
    trained = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in zero.items()}
    engine.update_weights(lora=trained)
    loaded = get_peft_model_state_dict(model)
    assert all(torch.equal(loaded[k], trained[k]) for k in trained)
    assert tokens(engine.generate(prompts, GREEDY)) != tokens(base_out)

    engine.update_weights(lora=zero)
    assert tokens(engine.generate(prompts, GREEDY)) == tokens(base_out)
    with pytest.raises(KeyError, match="not in adapter"):
        engine.update_weights(lora={"base_model.model.no_such.lora_A.weight": torch.zeros(1)})


def test_sleep_and_wake_up(stories, prompts):
    engine = HFEngine(*stories)
    before = engine.generate(prompts, GREEDY)
    engine.sleep()
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate(prompts, GREEDY)
    engine.wake_up()
    assert tokens(engine.generate(prompts, GREEDY)) == tokens(before)


def test_generates_from_the_shared_actor_role_without_copying(stories, prompts):
    """The engine runs the multi-head model's own parameters under the actor adapter: nothing is
    copied, a change to the actor is seen at once, and the trainer's verb agrees on log-probs."""
    from align.models.multihead import MultiHeadModel, RoleConfig

    _, tok = stories
    base = build_tiny_llama(seed=0, hidden_size=64, num_layers=2, num_heads=2)
    mh = MultiHeadModel(base, {"actor": RoleConfig(r=4, dropout=0.2), "critic": RoleConfig(r=4)})
    with torch.no_grad():  # a "trained" actor: non-zero lora_B, so actor != reference
        for p in mh.trainable_parameters("actor"):
            p.normal_(0, 0.3)
    mh.train()  # as the trainer leaves it; the engine must still decode without dropout
    engine = HFEngine(mh, tok, eos_token_id=[], role=lambda: mh.using("actor"))
    ptrs = pointers(mh)

    first = engine.generate(prompts, GREEDY)
    assert tokens(engine.generate(prompts, GREEDY)) == tokens(first), "dropout must be off while decoding"
    assert mh.training and mh.peft.training, "the trainer's mode is restored"
    assert pointers(mh) == ptrs
    with mh.using("actor") as m:
        shared = {p.data_ptr() for p in mh.parameters()}
        assert {p.data_ptr() for p in m.parameters()} <= shared  # the generator's weights are the model's
    with mh.using("reference") as m:
        reference = HFEngine(m, tok, eos_token_id=[]).generate(prompts, GREEDY)
    assert tokens(first) != tokens(reference), "the actor adapter is active while generating"

    # The trainer's own recompute at the sampling temperature equals the engine's.
    sampled = engine.generate(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=16, seed=0))
    mh.eval()
    for s in sampled.samples:
        ids = torch.tensor([prompts[s.prompt_index] + s.token_ids])
        with torch.no_grad():
            logp = mh.log_probs(ids, torch.ones_like(ids), role="actor", temperature=0.7)[0, -len(s.token_ids) :]
        assert torch.allclose(torch.tensor(s.logprobs), logp, atol=1e-4)

    # An optimizer step on the actor is seen without any sync; update_weights is a no-op.
    engine.update_weights(lora=mh.adapter_state_dict("actor"))
    with torch.no_grad():
        for p in mh.trainable_parameters("actor"):
            p.mul_(3.0)  # the update B @ A grows 9-fold
    assert tokens(engine.generate(prompts, GREEDY)) != tokens(first)
    assert pointers(mh) == ptrs
