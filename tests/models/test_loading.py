"""Loading causal LMs and tokenizers: local folders, dtypes, pad tokens, tiny models, 4-bit NF4."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from align.models import (
    build_tiny_llama,
    ensure_pad_token,
    load_causal_lm,
    load_model_and_tokenizer,
    load_tokenizer,
    loading,
    resolve_dtype,
)


def test_a_local_folder_loads_the_stored_weights(stories_path):
    from safetensors.torch import load_file

    model = load_causal_lm(stories_path)
    stored = load_file(os.path.join(stories_path, "model.safetensors"))
    live = model.state_dict()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 512
    assert stored and all(torch.equal(live[k], v) for k, v in stored.items())
    # tied embeddings: the LM head is the embedding matrix, not a second copy
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16)])
def test_dtype_choices(stories_path, name, dtype):
    model = load_causal_lm(stories_path, dtype=name)
    assert {p.dtype for p in model.parameters()} == {dtype}
    reference = load_causal_lm(stories_path, dtype="float32")
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight.to(dtype))


def test_unknown_dtype_names_the_valid_ones():
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_dtype("float8")
    assert resolve_dtype(torch.float16) is torch.float16


def test_pad_token_is_set_when_missing_and_mirrored_into_the_model(stories_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(stories_path)
    assert raw.pad_token is None  # stories260K ships without one
    model, tok = load_model_and_tokenizer(stories_path)
    assert tok.pad_token == tok.unk_token and tok.pad_token_id == 0
    assert model.config.pad_token_id == 0 and model.generation_config.pad_token_id == 0
    assert tok.padding_side == "right" and load_tokenizer(stories_path, padding_side="left").padding_side == "left"
    enc = tok(["Once upon a time", "Hi"], padding=True, return_tensors="pt")
    assert enc.attention_mask[1].sum() < enc.attention_mask[0].sum()


def test_a_tokenizer_without_unk_or_eos_gets_a_new_pad_and_the_model_grows(shared_data):
    from transformers import PreTrainedTokenizerFast

    path = str(shared_data / "tokenizers" / "gpt-neox-20b" / "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=path)
    assert tok.pad_token is None and tok.unk_token is None and tok.eos_token is None
    n = len(tok)
    model = build_tiny_llama(vocab_size=n, hidden_size=8, num_layers=1, num_heads=1)
    ensure_pad_token(tok, model)
    assert tok.pad_token == "<pad>" and tok.pad_token_id == n
    assert model.get_input_embeddings().num_embeddings == n + 1 and model.config.pad_token_id == n

    eos_only = PreTrainedTokenizerFast(tokenizer_file=path, eos_token="<|endoftext|>")
    ensure_pad_token(eos_only)
    assert eos_only.pad_token == "<|endoftext|>"


def test_tiny_llama_from_config_is_deterministic_under_its_seed():
    a = build_tiny_llama(seed=3, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    b = build_tiny_llama(seed=3, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    c = build_tiny_llama(seed=4, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg = a.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (32, 2, 4, 2)
    assert cfg.intermediate_size == 128 and not a.training
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)
    with torch.no_grad():
        assert a(torch.tensor([[1, 5, 9]])).logits.shape == (1, 3, 512)


def test_nf4_without_bitsandbytes_fails_naming_the_option_and_the_install(monkeypatch, stories_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ImportError, match=r"quantization='nf4'.*pip install 'align\[qlora\]'"):
        load_causal_lm(stories_path, quantization="nf4")
    with pytest.raises(ValueError, match="valid: \\['nf4'\\]"):
        load_causal_lm(stories_path, quantization="int3")
