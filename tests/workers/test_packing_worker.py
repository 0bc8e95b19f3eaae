"""The RL worker with `trainer.max_tokens_per_micro`: padding-free, token-budget micro-batches in
the actor and critic updates and in the no-grad annotate pass give the padded path's numbers
(annotate outputs, and through plain SGD the same weights) to 1e-5 in fp32."""

from __future__ import annotations

from dataclasses import replace

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
