"""Padding-free packing and token-budget micro-batches (`trainer.max_tokens_per_micro`).

Every trainer's packed, token-budgeted step equals its padded, row-count step: the same loss
and, through plain SGD, the same weights (gradients) to 1e-5 in fp32. The losses keep the
whole step's normaliser, so how the step is cut does not change the result.
"""

from __future__ import annotations

import pytest
import torch

from align.config import ConfigError, DPOConfig, ModelConfig, compose
from align.data.packing import token_budget_micro_batches

# ------------------------------------------------------------------------------ the micro-batch cut


def test_token_budget_cut_fits_the_budget_keeps_every_example_once_and_balances():
    lengths = [50, 7, 33, 90, 12, 64, 5, 41, 28, 77]
    cuts = token_budget_micro_batches(lengths, 128)
    assert sorted(i for c in cuts for i in c) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in c) for c in cuts]
    assert max(loads) <= 128
    assert len(cuts) == -(-sum(lengths) // 128)  # 407 tokens: 4 micro-batches, the fewest possible here
    assert max(loads) - min(loads) < max(lengths)  # longest-first into the lightest: balanced
    assert all(c == sorted(c) for c in cuts)
    assert token_budget_micro_batches(lengths, 128) == cuts  # deterministic


def test_min_count_forces_the_number_of_micro_batches():
    """Data-parallel ranks agree on one count (the max over ranks); too few examples leave empty ones."""
    assert len(token_budget_micro_batches([10, 10, 10, 10], 1000, min_count=3)) == 3
    assert token_budget_micro_batches([10, 10], 1000, min_count=3)[-1] == []


def test_a_budget_below_the_longest_example_names_the_key():
    with pytest.raises(ConfigError, match=r"trainer\.max_tokens_per_micro=40.*example 1 .*41 tokens"):
        token_budget_micro_batches([12, 41, 3], 40)
    with pytest.raises(ConfigError, match="trainer.max_tokens_per_micro"):
        compose(["trainer.max_tokens_per_micro=0"])


# ---------------------------------------------------------------------------- the packed forward


def _tiny(kind: str, impl: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(kind, vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = impl
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_rows_attend_within_themselves_only(kind, impl):
    """Rows padded left, right and both, packed two to a row with restarting position ids and no
    attention mask: the hidden states and next-token log-probs equal the padded forward's (the
    model builds the block-diagonal mask itself)."""
    from align.models.roles import head_logprobs, lm_backbone, packed_hidden, packed_token_logprobs, pad_hidden, unpad

    model = _tiny(kind, impl)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 97, (4, 10), generator=g)
    mask = torch.zeros(4, 10, dtype=torch.long)
    mask[0, :7] = 1  # right-padded, 7 tokens
    mask[1, 7:] = 1  # left-padded, 3
    mask[2, 2:6] = 1  # both sides, 4
    mask[3, :5] = 1  # 5
    packed_ids, positions, _, _ = unpad(ids, mask)
    assert packed_ids.shape == (2, 10)  # [7 + 3], [5 + 4 + 1 padding]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 5, 6, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]]
    backbone = lm_backbone(model)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).last_hidden_state
    hidden, index = packed_hidden(backbone, ids, mask)
    assert hidden.shape == (1, int(mask.sum()), 32)
    real = mask.bool()
    torch.testing.assert_close(pad_hidden(hidden, index, (4, 10))[real], padded[real], atol=1e-5, rtol=1e-5)
    scored = (mask[:, 1:] * mask[:, :-1]).bool()
    expected = head_logprobs(model, padded[:, :-1], ids[:, 1:])
    got = packed_token_logprobs(model, hidden, ids, index, (4, 10))
    torch.testing.assert_close(got[scored], expected[scored], atol=1e-5, rtol=1e-5)
    assert (got[~scored] == 0).all()


# ------------------------------------------------------------------------------ SFT and RM runs

SMALL = [
    "data.limit=48", "data.val_size=8", "data.max_length=96", "data.max_prompt_length=64",
    "data.max_response_length=32", "trainer.batch_size=4", "trainer.grad_accum=2", "trainer.eval_batches=1",
    "trainer.progress=false", "trainer.num_threads=1", "trainer.max_steps=1", "trainer.max_grad_norm=0",
    "trainer.warmup_steps=0", "trainer.lr_scheduler=constant", "trainer.optimizer=sgd", "trainer.lr=0.5",
    "trainer.loggers=[jsonl]",
]


def _one_step(out, algo: str, *overrides):
    """Run one SGD step; return the step's logged loss and the saved trainable weights."""
    from safetensors.torch import load_file

    from align.trainers import run
    from align.trainers.metrics import read_metrics

    cfg, raw = compose([f"algo={algo}", *SMALL, f"output_dir={out}", *overrides])
    run(cfg, raw)
    loss = [r for r in read_metrics(out) if r["step"] == 1][0]["loss"]
    return loss, load_file(str(out / "checkpoints" / "step_1" / "trainable.safetensors"))


@pytest.mark.parametrize("algo,extra", [("sft", ["algo.loss_agg=token-mean"]),
                                        ("sft", ["algo.loss_agg=seq-mean-token-mean"]),
                                        ("rm", ["algo.export=false"])])
def test_packed_token_budget_step_equals_the_padded_step(tmp_path, algo, extra):
    """8 examples as 2 padded micro-batches of 4 rows, and as padding-free micro-batches of at
    most 160 tokens (a different cut: 3+ micro-batches of unequal sizes): the same loss and
    the same SGD step."""
    before = torch.get_num_threads()
    try:
        padded = _one_step(tmp_path / "padded", algo, *extra)
        packed = _one_step(tmp_path / "packed", algo, *extra, "trainer.max_tokens_per_micro=200")
    finally:
        torch.set_num_threads(before)
    assert packed[0] == pytest.approx(padded[0], rel=1e-5)
    assert packed[1].keys() == padded[1].keys()
    for name in padded[1]:
        torch.testing.assert_close(packed[1][name], padded[1][name], atol=1e-5, rtol=1e-5, msg=name)


def test_a_budget_below_the_longest_sequence_is_refused(tmp_path):
    from align.trainers import run

    cfg, raw = compose(["algo=sft", *SMALL, f"output_dir={tmp_path}", "trainer.max_tokens_per_micro=8"])
    with pytest.raises(ConfigError, match=r"trainer\.max_tokens_per_micro=8 is smaller than"):
        run(cfg, raw)


# ----------------------------------------------------------------------------------- DPO and KTO


@pytest.fixture(scope="module")
def tokenizer(stories_path):
    from align.models import load_tokenizer

    return load_tokenizer(stories_path)


@pytest.fixture(scope="module")
def pair_items(tokenizer, shared_data):
    from align.data import build_split, tokenize_pairs

    pairs, _ = build_split(str(shared_data / "hh-rlhf" / "helpful-base_test.jsonl.gz"), "hh", val_size=0,
                           on_error="skip", limit=6)
    return tokenize_pairs(pairs, tokenizer, max_length=200, max_prompt_length=120, max_response_length=80)


def _grads(model, objective, micro):
    from align.trainers.dpo import step_loss

    model.zero_grad(set_to_none=True)
    loss, _ = step_loss(objective, model, micro)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss,share_prompt", [("sigmoid", True), ("sigmoid", False), ("orpo", True), ("kto", True)])
def test_packed_preference_step_equals_the_padded_step(loss, share_prompt, stories_path, pair_items, tokenizer,
                                                       monkeypatch):
    """One step of 6 pairs (KTO: 6 unpaired examples): padded, 2 micro-batches of 3, against
    padding-free token-budget micro-batches of unequal sizes: equal loss and gradients. With
    share_prompt the packed objective also takes the shared-prompt pass where it computes fewer
    positions; the test forces each choice once (the cost rule tilted both ways)."""
    from align.trainers import dpo
    from align.trainers.common import step_micro_batches
    from align.trainers.dpo import PreferenceObjective, assign_mismatched, collate, item_tokens, unpair
    from align.trainers.setup import build_policy

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    items = [dict(x, ref=(-40 + 10 * torch.rand(2, generator=g)).tolist()) for x in pair_items]
    if loss == "kto":
        items = unpair(pair_items[:3])
        assign_mismatched(items, max_length=200, seed=0)
        items = [dict(x, ref=[-70.0 + i, -90.0 - i]) for i, x in enumerate(items)]
    torch.manual_seed(0)
    model, _ = build_policy(ModelConfig(name_or_path=stories_path, finetune="full"))
    model.train()
    algo = DPOConfig(loss=loss, beta=0.1 if loss != "orpo" else 0.5, unpair=loss == "kto", share_prompt=share_prompt)
    pad, cpu = tokenizer.pad_token_id, torch.device("cpu")
    padded = _grads(model, PreferenceObjective(algo, None), [collate(items[:3], pad, cpu), collate(items[3:], pad, cpu)])
    budget = 2 * max(item_tokens(x) for x in items) - 100
    cuts = step_micro_batches([items], budget, item_tokens)
    assert len(cuts) >= 2 and len({len(c) for c in cuts}) > 1  # unequal micro-batches
    micro = [collate(c, pad, cpu) for c in cuts]
    cost, shared_pass, calls = dpo.shared_prompt_cost, dpo.shared_prompt_logps, []
    monkeypatch.setattr(dpo, "shared_prompt_logps", lambda *a, **kw: calls.append(1) or shared_pass(*a, **kw))
    for tilt in ((0, 10**9), (10**9, 0)) if share_prompt and loss != "kto" else ((0, 0),):
        monkeypatch.setattr(dpo, "shared_prompt_cost", lambda p, r, k, t=tilt: (cost(p, r, k)[0] + t[0],
                                                                                 cost(p, r, k)[1] + t[1]))
        calls.clear()
        packed = _grads(model, PreferenceObjective(algo, None, packed=True), micro)
        assert len(calls) == (len(micro) if tilt[1] else 0)  # the shared pass ran where it was cheaper only
        assert packed[0] == pytest.approx(padded[0], rel=1e-5, abs=1e-6)
        assert packed[1].keys() == padded[1].keys()
        for name in padded[1]:
            scale = padded[1][name].abs().max().item()
            torch.testing.assert_close(packed[1][name], padded[1][name], rtol=1e-5, atol=1e-5 * max(scale, 1.0),
                                       msg=name)
