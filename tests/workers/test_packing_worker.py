"""The RL worker with `trainer.max_tokens_per_micro`: padding-free, token-budget micro-batches in
the actor and critic updates and in the no-grad annotate pass give the padded path's numbers
(annotate outputs, and through plain SGD the same weights) to 1e-5 in fp32."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_data_parallel import ROLES, losses, make_batch, spec_for  # tests/workers is on sys.path

from align.models import roles as roles_module
from align.workers.batch import Experience
from align.workers.worker import ModelWorker


def _grouped(batch: Experience) -> Experience:
    """Rows 4g..4g+3 answer one prompt (a GRPO group): the shared-prompt pass has work to share."""
    first = (torch.arange(len(batch)) // 4) * 4
    return batch.replace(prompt_ids=batch.prompt_ids[first], prompt_mask=batch.prompt_mask[first])


def test_packed_annotate_and_updates_equal_the_padded_path(stories_path, monkeypatch):
    torch.set_num_threads(1)
    spec = spec_for(stories_path)
    worker = ModelWorker(spec)
    initial = {r: worker.trainable_state(r) for r in ROLES}
    packed_calls = []
    real_packed_hidden = roles_module.packed_hidden
    monkeypatch.setattr(roles_module, "packed_hidden", lambda *a: packed_calls.append(1) or real_packed_hidden(*a))

    def run(budget):
        for role in ROLES:  # every run starts from the same weights (SGD keeps no state)
            with torch.no_grad():
                for p, w in zip(worker.model.trainable_parameters(role), initial[role]):
                    p.copy_(w)
        worker.spec = replace(spec, trainer=replace(spec.trainer, max_tokens_per_micro=budget))
        worker.model.packed = budget is not None
        batch = Experience.concat([make_batch(8, seed=1), _grouped(make_batch(8, seed=2))])
        notes = worker.annotate(batch, ("reference", "actor", "critic"))
        batch = batch.replace(**notes)
        normaliser = float(batch.response_mask.sum())
        worker.update_actor([batch], [normaliser], losses(4)["actor"])
        worker.update_critic([batch], [normaliser], losses(4)["critic"])
        return notes, {r: worker.trainable_state(r) for r in ROLES}

    padded_notes, padded = run(None)
    assert not packed_calls
    packed_notes, packed = run(40)  # rows are 5..15 tokens: micro-batches of unequal row counts
    assert packed_calls  # the padding-free pass ran
    mask = make_batch(8, seed=1).response_mask
    for key in ("ref_logp", "old_logp", "values"):
        got, want = packed_notes[key], padded_notes[key]
        real = torch.cat([mask, _grouped(make_batch(8, seed=2)).response_mask])
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5, msg=key)
    rows = make_batch(8, seed=3)
    ids, attention = rows.input_ids, rows.attention_mask
    scored = (attention[:, 1:] * attention[:, :-1]).bool()
    with torch.no_grad():
        packed_lp = worker.model.log_probs(ids, attention, role="reference")  # still packed from run(40)
        worker.model.packed = False
        padded_lp = worker.model.log_probs(ids, attention, role="reference")
    torch.testing.assert_close(packed_lp[scored], padded_lp[scored], atol=1e-5, rtol=1e-5)
    for role in ROLES:
        moved = max(float((a - b).abs().max()) for a, b in zip(padded[role], initial[role]))
        assert moved > 1e-4
        for a, b in zip(packed[role], padded[role]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_shared_prompt_responses_run_packed_with_the_padded_values_and_gradients(stories_path, impl, finetune):
    """GRPO groups (4 rows per prompt, responses of 2..9 tokens): packed, each prompt runs once and
    its responses run packed into rows over its cached keys and values (2-3 packed rows per group
    instead of 4 padded ones); log-probs, entropies and their gradients (through the cache into
    the prompt pass) equal the padded shared-prompt pass's."""
    from align.models.roles import pack_group_responses

    torch.set_num_threads(1)
    model = ModelWorker(spec_for(stories_path, finetune=finetune)).model
    model._causal_lm("actor").config._attn_implementation = impl
    batch = _grouped(make_batch(16, seed=5))
    lengths = batch.response_mask.sum(1)
    _, distinct_row = torch.unique(torch.cat([batch.prompt_ids, batch.prompt_mask], 1), dim=0, return_inverse=True)
    packed_prompt, segment, _, _ = pack_group_responses(distinct_row, lengths, batch.response_ids.shape[1])
    assert len(packed_prompt) < len(batch)  # responses share rows: fewer positions to run
    assert ((segment >= 0).sum(1) <= segment.shape[1]).all() and int((segment >= 0).sum()) == int(lengths.sum())
    params = model.trainable_parameters("actor")

    def run(packed: bool):
        model.packed = packed
        model.zero_grad(set_to_none=True)
        logp, ent = model.response_log_probs(batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                             batch.response_mask, role="actor", entropy=True)
        mask = batch.response_mask
        (logp[mask].sum() + 0.1 * ent[mask].sum()).backward()
        return logp[mask].detach(), ent[mask].detach(), [p.grad.clone() for p in params if p.grad is not None]

    calls = []
    real = model._packed_responses
    model._packed_responses = lambda *a, **k: calls.append(1) or real(*a, **k)
    padded = run(False)
    assert not calls
    packed = run(True)
    assert calls  # the packed responses pass ran
    for got, want in zip(packed[:2], padded[:2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(packed[2]) == len(padded[2]) > 0
    for got, want in zip(packed[2], padded[2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
