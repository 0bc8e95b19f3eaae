"""QLoRA: the shared base in 4-bit NF4 with double quantization (runs where bitsandbytes does)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from align.core.logprobs import logprobs_from_logits  # noqa: E402
from align.models import load_causal_lm  # noqa: E402
from align.models.multihead import MultiHeadModel, RoleConfig  # noqa: E402


def test_nf4_base_serves_the_roles_and_a_step_moves_only_the_adapter(stories_path, batch, tmp_path):
    import bitsandbytes as bnb

    ids, mask = batch
    base = load_causal_lm(stories_path, quantization="nf4")
    q_proj = base.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantization
    assert base.is_loaded_in_4bit

    # the 4-bit model is a close copy of the fp32 one: the story's negative log-likelihood moves little
    full = load_causal_lm(stories_path).eval()
    real = mask[:, 1:].bool()
    with torch.no_grad():
        nll_full = -logprobs_from_logits(full(input_ids=ids, attention_mask=mask).logits[:, :-1], ids[:, 1:])[real].mean()
        nll_4bit = -logprobs_from_logits(base(input_ids=ids, attention_mask=mask).logits[:, :-1], ids[:, 1:])[real].mean()
    assert abs(nll_4bit - nll_full) < 0.1 * nll_full

    model = MultiHeadModel(base, {"actor": RoleConfig(r=4), "critic": RoleConfig(r=4)}, pad_token_id=0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = -model.log_probs(ids, mask)[real].mean()
    loss.backward()
    torch.optim.AdamW(model.trainable_parameters("actor"), lr=1e-2).step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_B.actor." in k or ".lora_A.actor." in k for k in changed)
    assert any("base_layer.weight" in k and before[k].dtype == torch.uint8 for k in before)  # packed 4-bit

    with torch.no_grad():
        out = model.multi_role_forward(ids, mask, roles=("reference", "critic"), mode="mixed")
        torch.testing.assert_close(out["critic"], model.values(ids, mask), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="quantized"):
        model.export_merged_actor(str(tmp_path))
