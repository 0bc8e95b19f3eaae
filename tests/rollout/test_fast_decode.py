"""The HF engine's lean decode step (`rollout.fast_decode.LlamaDecoder`) against the model's forward.

Each covered architecture is built tiny and random from its config, with grouped-query attention,
and for Qwen2 the q/k/v biases; prompts of different lengths exercise the left padding, n > 1 the
shared prefill whose cache the decoder gathers per row.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from rollout import HFEngine, SamplingParams
from rollout.fast_decode import LlamaDecoder

SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)


def tiny(config_cls, dtype=torch.float32, **extra):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**SHAPE, **extra)).to(dtype).eval()


ARCHITECTURES = {
    "llama": lambda: tiny(LlamaConfig),
    "llama-linear-rope": lambda: tiny(LlamaConfig, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral": lambda: tiny(MistralConfig),
    "qwen2-bias": lambda: tiny(Qwen2Config),
}


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_engine_output_equals_the_forward_path(name, stories, prompts):
    _, tok = stories
    model = ARCHITECTURES[name]()
    if name == "qwen2-bias":  # biases start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    assert LlamaDecoder.build(model, 64) is not None
    params = SamplingParams(n=3, temperature=0, max_new_tokens=20)
    fast = HFEngine(model, tok, eos_token_id=[]).generate(prompts, params)
    slow = HFEngine(model, tok, eos_token_id=[], fast_decode=False).generate(prompts, params)
    assert [s.token_ids for s in fast.samples] == [s.token_ids for s in slow.samples]
    worst = max(abs(a - b) for f, s in zip(fast.samples, slow.samples) for a, b in zip(f.logprobs, s.logprobs))
    assert worst < 1e-4, worst


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_each_step_matches_a_full_forward(dtype, tolerance):
    """Decode 12 steps with left-padded rows; every step's logits equal the last position's logits of
    the whole sequence run through the model at once."""
    model = tiny(LlamaConfig, dtype=dtype)
    torch.manual_seed(1)
    ids = torch.randint(3, 512, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0: 4-token prompt, row 1 and 2: 7 tokens
    steps = 12
    with torch.inference_mode():
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        cache = out.get("cache", out.get("past_key_values"))
        decoder = LlamaDecoder.build(model, ids.shape[1] + steps)
        decoder.start(cache, mask, None, ids.shape[1] + steps)
        seq, seq_mask = ids, mask
        token, position = out.logits[:, -1].argmax(-1), position_ids[:, -1] + 1
        for _ in range(steps):
            logits = decoder.step(token, position).float()
            seq = torch.cat([seq, token[:, None]], -1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(token)[:, None]], -1)
            full = model(input_ids=seq, attention_mask=seq_mask,
                         position_ids=(seq_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1].float()
            assert (logits - full).abs().max() < tolerance
            token, position = full.argmax(-1), position + 1


def test_uncovered_models_keep_the_forward(stories, prompts):
    """LoRA layers, length-dependent rope, a short sliding window and other architectures are not
    covered; the engine then falls back to the forward and still generates."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config

    lora = get_peft_model(tiny(LlamaConfig), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert LlamaDecoder.build(lora, 64) is None
    assert LlamaDecoder.build(lora.get_base_model(), 64) is None  # its q_proj is a LoRA layer now
    assert LlamaDecoder.build(tiny(LlamaConfig, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 64) is None
    windowed = tiny(MistralConfig, sliding_window=16)
    assert LlamaDecoder.build(windowed, 16) is not None
    assert LlamaDecoder.build(windowed, 17) is None
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=512, n_embd=32, n_layer=1, n_head=2)).eval()
    assert LlamaDecoder.build(gpt2, 64) is None

    _, tok = stories
    out = HFEngine(lora, tok, eos_token_id=[]).generate(prompts, SamplingParams(temperature=0, max_new_tokens=5))
    assert [len(s.token_ids) for s in out.samples] == [5] * len(prompts)
