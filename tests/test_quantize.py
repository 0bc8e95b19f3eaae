"""The quantization stage on the shipped stories260K: bytes on disk, held-out perplexity, the
reload through our loader, LoRA merging, the Hydra stage.

The reference for every quantized model is a naive round-to-nearest written here, row by row:
symmetric b-bit with one scale per output row (or per group of g inputs),
    s = max|w| / ((2^b - 1) / 2),   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   w' = q * s,
the recipe compressed-tensors' `calculate_qparams` documents (the range [-2^(b-1), 2^(b-1) - 1]
is 2^b - 1 wide). Linear layers but the LM head are quantized; embeddings and norms are not.

stories260K: dim 64, 5 layers, q/o 64x64, k/v 32x64, gate/up 172x64, down 64x172, tied 512x64
embeddings. fp32 on disk: 1,044,992 bytes, of which the 226,560 linear weights are 906,240.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("compressed_tensors")

from align.quantize import (  # noqa: E402
    format_report,
    held_out_texts,
    mean_nll,
    quantize,
    weight_bytes,
)

# Small, fast settings: 8 HH test responses of up to 64 tokens; a 2 x 4-token speed test.
FAST = dict(eval_samples=8, max_length=64, speed_prompts=2, max_new_tokens=4, speed_rounds=1, num_threads=1)
REPORT_KEYS = {
    "method", "backend", "format", "group_size", "input", "merged_adapter", "bytes_before", "bytes_after",
    "compression_ratio", "nll_before", "nll_after", "ppl_before", "ppl_after", "ppl_change", "eval_source",
    "eval_texts", "eval_tokens", "tokens_per_s_before", "tokens_per_s_after", "speed_ratio", "generated_tokens",
    "device",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on two shared cores OpenMP spinning makes a tiny model ~20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ct_int8(stories_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct-int8")
    return out, quantize(stories_path, str(out), "int8", **FAST)


@pytest.fixture(scope="module")
def ct_int4(stories_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("ct-int4")
    return out, quantize(stories_path, str(out), "int4", **FAST)


def naive_rtn(model, bits: int, group_size: int | None = None):
    """`model` with every Linear but lm_head replaced by its RTN round trip (the formula above),
    one weight row at a time."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
                continue
            for row in module.weight:  # (in,)
                groups = row.view(-1, group_size or row.numel())  # (in / g, g)
                scale = groups.abs().amax(dim=1, keepdim=True) / ((2**bits - 1) / 2)
                groups.copy_(torch.clamp(torch.round(groups / scale), qmin, qmax) * scale)
    return model


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


METHOD_BITS = {"int8": 8, "int4": 4}
IDS = torch.tensor([[1, 403, 407, 261, 378, 300, 29, 400, 289, 265, 411, 42]])


def test_report_fields_and_bytes_match_the_files(ct_int8, stories_path):
    out, report = ct_int8
    assert set(report) == REPORT_KEYS
    assert json.loads((out / "report.json").read_text()) == report
    assert report["bytes_before"] == (Path(stories_path) / "model.safetensors").stat().st_size == 1_044_992
    weight_files = [p for p in out.iterdir() if p.suffix in (".safetensors", ".bin")]
    assert [p.name for p in weight_files] == ["model.safetensors"]
    assert report["bytes_after"] == weight_files[0].stat().st_size == weight_bytes(out)
    assert report["compression_ratio"] == pytest.approx(report["bytes_before"] / report["bytes_after"])
    assert report["ppl_before"] == pytest.approx(math.exp(report["nll_before"]))
    assert report["ppl_change"] == pytest.approx(report["ppl_after"] / report["ppl_before"] - 1)
    assert report["speed_ratio"] == pytest.approx(report["tokens_per_s_after"] / report["tokens_per_s_before"])
    assert report["tokens_per_s_before"] > 0 and report["tokens_per_s_after"] > 0
    assert report["generated_tokens"] == 2 * 4 and report["eval_texts"] == 8 and report["eval_tokens"] > 8 * 10
    for line in ("weights on disk", "perplexity", "greedy tokens/s"):
        assert line in format_report(report)


def test_int8_shrinks_weights_and_barely_moves_perplexity(ct_int8):
    """Linear weights 4 -> 1 byte; the 131,072 bytes of fp32 embeddings stay: the bound is
    1,044,992 / (131,072 + 226,560 + scales and header) ~ 2.7."""
    out, report = ct_int8
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8 and qc["ignore"] == ["lm_head"]
    assert report["compression_ratio"] > 2.6
    assert math.isfinite(report["ppl_after"]) and abs(report["ppl_change"]) < 0.02


def test_int4_packs_eight_weights_per_int32(ct_int4, ct_int8):
    from safetensors import safe_open

    out, report = ct_int4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        packed = [k for k in f.keys() if k.endswith("weight_packed")]
        assert len(packed) == 5 * 7
        for key in packed:
            rows, cols = f.get_tensor(key.replace("weight_packed", "weight_shape")).tolist()
            tensor = f.get_tensor(key)
            assert tensor.dtype == torch.int32
            # Each row packs its int4 values eight to an int32 word; a row of 172 ends in a part-filled word.
            assert tensor.shape == (rows, math.ceil(cols / 8))
    assert report["compression_ratio"] > 3.6 > ct_int8[1]["compression_ratio"]
    # int4 per channel costs a tiny model real quality, but stays finite and bounded.
    assert abs(ct_int8[1]["ppl_change"]) < report["ppl_change"] < 0.6


@pytest.mark.parametrize("bits", [8, 4])
def test_reload_with_our_loader_equals_naive_rtn(bits, ct_int8, ct_int4, stories_path):
    from align.models.loading import load_causal_lm, load_model_and_tokenizer

    out = (ct_int8 if bits == 8 else ct_int4)[0]
    reloaded, tok = load_model_and_tokenizer(str(out))
    expected = naive_rtn(load_causal_lm(stories_path), bits)
    torch.testing.assert_close(logits_of(reloaded, IDS), logits_of(expected, IDS), atol=1e-4, rtol=1e-4)
    gen = reloaded.generate(IDS[:, :4], do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, 12)


def test_group_size_quantizes_per_group_and_must_divide_widths(stories_path, tmp_path):
    from align.models.loading import load_causal_lm
    from align.quantize import _quantize_compressed_tensors

    with pytest.raises(ValueError, match=r"down_proj: 172"):
        _quantize_compressed_tensors(stories_path, str(tmp_path / "g32"), 4, 32)
    _quantize_compressed_tensors(stories_path, str(tmp_path / "g4"), 4, 4)  # 4 divides 64, 32 and 172
    expected = naive_rtn(load_causal_lm(stories_path), 4, group_size=4)
    reloaded = load_causal_lm(str(tmp_path / "g4"))
    torch.testing.assert_close(logits_of(reloaded, IDS), logits_of(expected, IDS), atol=1e-4, rtol=1e-4)


def test_lora_adapter_input_is_merged_before_quantizing(stories_path, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from align.models.loading import load_causal_lm, load_tokenizer

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # random A and B: the adapter changes the model
    get_peft_model(load_causal_lm(stories_path), config).save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(load_causal_lm(stories_path), tmp_path / "adapter").merge_and_unload()
    texts = held_out_texts("hh", 4)
    tok = load_tokenizer(stories_path)

    report = quantize(str(tmp_path / "adapter"), str(tmp_path / "q"), "int8", eval_texts=texts,
                      **dict(FAST, eval_samples=4))
    assert report["merged_adapter"] is True and report["eval_source"] == "texts"
    nll_merged, _ = mean_nll(merged, tok, texts, max_length=64)
    nll_base, _ = mean_nll(load_causal_lm(stories_path), tok, texts, max_length=64)
    assert report["nll_before"] == pytest.approx(nll_merged, rel=1e-6)
    assert abs(nll_merged - nll_base) > 1e-3
    # The quantized weights are those of the merged model, not of the base.
    expected = naive_rtn(merged, 8)
    torch.testing.assert_close(logits_of(load_causal_lm(str(tmp_path / "q")), IDS), logits_of(expected, IDS),
                               atol=1e-4, rtol=1e-4)


def test_exported_actor_of_the_multihead_model_is_what_gets_quantized(stories_path, tmp_path):
    """The issue's pipeline: train (here: perturb) the actor's LoRA adapter, export it merged,
    quantize. The report's unquantized NLL is the live actor's, not the base's."""
    from align.models.loading import load_causal_lm, load_tokenizer
    from align.models.multihead import MultiHeadModel, RoleConfig

    torch.manual_seed(0)
    model = MultiHeadModel(load_causal_lm(stories_path), {"actor": RoleConfig(r=4)})
    with torch.no_grad():
        for p in model.trainable_parameters("actor"):
            p.normal_(0.0, 0.05)
    tok = load_tokenizer(stories_path)
    model.export_merged_actor(str(tmp_path / "actor"), tok)
    texts = held_out_texts("hh", 4)
    report = quantize(str(tmp_path / "actor"), str(tmp_path / "q"), "int8", eval_texts=texts,
                      **dict(FAST, eval_samples=4))

    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=64)
    mask = enc["attention_mask"][:, 1:]  # (B, T-1)
    with torch.no_grad():
        actor_logp = model.log_probs(enc["input_ids"], enc["attention_mask"], role="actor")  # (B, T-1)
        ref_logp = model.log_probs(enc["input_ids"], enc["attention_mask"], role="reference")
    actor_nll = float(-(actor_logp * mask).sum() / mask.sum())
    ref_nll = float(-(ref_logp * mask).sum() / mask.sum())
    assert report["merged_adapter"] is False
    assert report["nll_before"] == pytest.approx(actor_nll, rel=1e-5)
    assert abs(actor_nll - ref_nll) > 1e-3 and abs(report["ppl_change"]) < 0.02


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_torchao_backend_saves_and_reloads(method, stories_path, tmp_path):
    """torchao stores the integer codes and per-row scales: the scales are ours exactly; a code
    may differ by one step where w / s lands on a rounding tie (e.g. -max|w| / s = -127.5,
    computed in a different order), which is a few weights per layer."""
    pytest.importorskip("torchao")
    from align.models.loading import load_causal_lm

    report = quantize(stories_path, str(tmp_path), method, "torchao", **FAST)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "torchao" and report["format"] == "torchao"
    # torchao on CPU stores int4 one value per byte (no packed CPU layout), so both are ~int8-sized.
    assert report["compression_ratio"] > 2.5
    assert abs(report["ppl_change"]) < (0.02 if method == "int8" else 0.6)
    reloaded, original = load_causal_lm(str(tmp_path)), load_causal_lm(stories_path)
    bits = METHOD_BITS[method]
    for name, module in original.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
            continue
        stored = reloaded.get_submodule(name).weight
        assert "torchao" in type(stored).__module__
        w = module.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / ((2**bits - 1) / 2)  # (out, 1)
        codes = torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        torch.testing.assert_close(stored.scale.reshape(-1, 1).float(), scale, rtol=1e-6, atol=0)
        steps = (stored.qdata.float() - codes).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01, name
    assert reloaded.generate(IDS[:, :4], do_sample=False, max_new_tokens=4, pad_token_id=0).shape == (1, 8)


def test_bad_arguments_name_the_valid_choices(stories_path, tmp_path):
    with pytest.raises(ValueError, match=r"int4.*int8"):
        quantize(stories_path, str(tmp_path), "int3")
    with pytest.raises(ValueError, match=r"compressed-tensors"):
        quantize(stories_path, str(tmp_path), "int8", "gptq")


def test_held_out_texts_are_real_and_deterministic(tmp_path):
    hh = held_out_texts("hh", 16)
    assert len(hh) == 16 == len(set(hh)) and hh == held_out_texts("hh", 16)
    assert all("Human:" not in t and "Assistant:" not in t for t in hh)
    assert all("####" in t for t in held_out_texts("gsm8k", 3))
    (tmp_path / "t.txt").write_text("one story\n\ntwo stories\n")
    assert held_out_texts(str(tmp_path / "t.txt"), 5) == ["one story", "two stories"]


def test_hydra_stage_writes_model_and_report(stories_path, tmp_path, capsys):
    from align.config import ConfigError, compose
    from align.models.loading import load_causal_lm
    from align.trainers import run

    overrides = ["algo=quantize", f"algo.input={stories_path}", "algo.method=int4", "algo.eval_samples=4",
                 "algo.max_length=32", "algo.speed_prompts=1", "algo.max_new_tokens=2", "trainer.num_threads=1",
                 f"output_dir={tmp_path}"]
    cfg, raw = compose(overrides)
    report = run(cfg, raw)
    assert "perplexity" in capsys.readouterr().out
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert json.loads((tmp_path / "quantized" / "report.json").read_text()) == report
    assert report["method"] == "int4" and report["compression_ratio"] > 3.6
    assert load_causal_lm(str(tmp_path / "quantized")) is not None
    with pytest.raises(ConfigError, match="algo.method"):
        compose(["algo=quantize", "algo.method=int3"])
