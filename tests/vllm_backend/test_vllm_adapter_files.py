"""The adapter folder the vLLM engine writes for a LoRA sync, checked without vLLM.

These run in every environment (the main one included): what vLLM reads is a peft folder, so
peft itself must load it back into the same tensors.
"""

from __future__ import annotations

import json

import pytest
import torch

from rollout.vllm_engine import _lora_rank, _peft_file_tensors, _write_adapter_config


def test_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [_lora_rank(r) for r in (1, 4, 8, 9, 16, 48, 512)] == [1, 8, 8, 16, 16, 64, 512]
    with pytest.raises(ValueError, match="largest"):
        _lora_rank(1024)


def test_peft_names_are_normalised():
    """Parameter names (with the adapter name) and state-dict names map to the same file key."""
    t = torch.ones(2, 3)
    by_param = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": t}
    by_state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": t}
    bare = {"model.layers.0.self_attn.q_proj.lora_A.weight": t}
    want = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    for tensors in (by_param, by_state, bare):
        assert list(_peft_file_tensors(tensors)) == want


def test_written_adapter_loads_back_in_peft(tmp_path):
    """Tensors and config written the engine's way load into a peft model unchanged."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
                                        num_key_value_heads=1, intermediate_size=64))
    config = {"r": 4, "lora_alpha": 8, "target_modules": {"q_proj", "v_proj"}, "lora_dropout": 0.0}
    model = get_peft_model(base, LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    named = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}  # with ".default."

    save_file(_peft_file_tensors(named), str(tmp_path / "adapter_model.safetensors"))
    _write_adapter_config(config, str(tmp_path))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["target_modules"] == ["q_proj", "v_proj"]

    fresh = LlamaForCausalLM(base.config)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
    want, got = get_peft_model_state_dict(model), get_peft_model_state_dict(loaded)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)

    # A LoraConfig object is written by peft itself.
    other = tmp_path / "from_config"
    other.mkdir()
    _write_adapter_config(LoraConfig(**config), str(other))
    assert json.loads((other / "adapter_config.json").read_text())["r"] == 4


def test_adapter_config_needs_rank_and_targets(tmp_path):
    with pytest.raises(ValueError, match="target_modules"):
        _write_adapter_config({"r": 8}, str(tmp_path))
