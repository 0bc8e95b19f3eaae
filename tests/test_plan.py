"""The memory planner (align/plan.py): its terms against what torch actually allocates, the start-up
check, and its predicted peaks against measured peak RSS of real runs (scripts/bench_plan.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.config import ConfigError, compose
from align.models import build_tiny_llama
from align.plan import check_memory, plan_run, read_model_shape

REPO = Path(__file__).resolve().parents[1]
# Llama-3-8B's published config (meta-llama/Meta-Llama-3-8B config.json), without weights.
LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}


def _tiny(tmp_path, **kw) -> str:
    folder = tmp_path / "tiny"
    build_tiny_llama(seed=0, vocab_size=512, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                     intermediate_size=344, tie_word_embeddings=True, **kw).save_pretrained(folder)
    return str(folder)


def test_shape_counts_the_parameters_torch_and_peft_allocate(tmp_path):
    """The parameter count from the meta-device model equals the loaded model's; the LoRA count
    r * (in + out) per linear equals peft's trainable parameters for all-linear and for a subset."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    path = _tiny(tmp_path)
    shape = read_model_shape(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.params == sum(p.numel() for p in model.parameters())
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                    LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert shape.lora_params(4, targets) == trainable


def test_activation_and_kv_formulas_match_what_autograd_and_the_cache_hold(tmp_path):
    """Activations: the bytes autograd saves for backward in one training forward (unique storages
    of saved tensors, minus the weights saved by the linears) are within 15% of the formula, with
    the (B, T, V) logits our log-prob function keeps. KV cache: exactly the formula's bytes."""
    from align.core import logprobs_from_logits

    path = _tiny(tmp_path)
    shape = read_model_shape(path)
    model = build_tiny_llama(seed=0, vocab_size=512, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                             intermediate_size=344, tie_word_embeddings=True).train()
    B, T = 4, 96
    ids = torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0  # left padding, as in RL batches: a real attention mask
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=mask).logits
        logprobs_from_logits(logits[:, :-1], ids[:, 1:])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(n for ptr, n in storages.items() if ptr not in weights)
    predicted = B * T * (shape.activation_elements_per_token(False) + shape.vocab) * 4
    assert abs(predicted - saved) / saved < 0.15, (predicted, saved)
    assert shape.activation_elements_per_token(True) < shape.activation_elements_per_token(False) / 2

    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert held == B * T * shape.kv_bytes_per_token(4)


def _llama3_folder(tmp_path) -> str:
    folder = tmp_path / "llama3-8b-config-only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA3_8B))
    return str(folder)


def test_an_8b_full_fine_tune_does_not_fit_and_lora_is_the_first_fix(tmp_path):
    """From a config alone (the folder has no weights): 8.03B parameters, fp32 full fine-tuning
    holds 16 bytes per parameter (weights, gradients, AdamW's two moments) beyond 80 GiB; the fixes
    are re-planned, LoRA first, and FSDP over 8 ranks divides the 16 bytes by 8."""
    path = _llama3_folder(tmp_path)
    cfg, _ = compose(["algo=sft", f"model.name_or_path={path}", "model.dtype=float32"])
    plan = plan_run(cfg, device="cuda", memory_bytes=80 * 2**30)
    assert plan.shape.params == 8_030_261_248  # the published parameter count of Llama-3-8B
    parts = plan.processes[0].parts
    assert parts["weights"] + parts["gradients"] + parts["optimizer state"] == 16 * plan.shape.params
    assert not plan.fits and "does not fit" not in plan.problems[0] and "GiB" in plan.problems[0]
    assert plan.fixes[0].startswith("model.finetune=lora")
    from dataclasses import replace

    fsdp8 = replace(plan.setup, strategy="fsdp2", world=8)
    sharded = plan_run(cfg, device="cuda", memory_bytes=80 * 2**30, setup=fsdp8)
    p = sharded.processes[0].parts
    assert p["gradients"] == parts["gradients"] // 8 and p["optimizer state"] == parts["optimizer state"] // 8


def test_a_sharded_full_fine_tune_counts_the_whole_rollout_copy(tmp_path):
    """GRPO with full fine-tuning: unsharded the HF engine generates on the actor itself (no copy
    counted); under fsdp2 the actor's worker holds a whole copy of the actor beside its shards (the
    model's parameters x bytes, not divided by the ranks), as the LoRA merged copy is counted."""
    path = _llama3_folder(tmp_path)
    common = ["algo=grpo", f"model.name_or_path={path}", "model.dtype=bfloat16", "trainer.precision=bf16-mixed"]
    copies = {}
    for name, extra in {"single": ["model.finetune=full"],
                        "fsdp2": ["model.finetune=full", "trainer.strategy=fsdp2", "cluster.num_replicas=2"],
                        "lora": ["model.finetune=lora"]}.items():
        cfg, _ = compose([*common, *extra])
        plan = plan_run(cfg, device="cuda", memory_bytes=80 * 2**30)
        copies[name] = plan.processes[0].parts["merged rollout copy"]
    assert copies == {"single": 0, "fsdp2": 2 * plan.shape.params, "lora": 2 * plan.shape.params}


def test_check_memory_warns_or_refuses(tmp_path):
    """An 8B model's fp32 full fine-tune (129 GB planned) on a machine stated to have 64 GiB: `warn`
    prints the problem and the fixes and returns the plan; `strict` raises naming the key."""
    import io
    from dataclasses import replace

    path = _llama3_folder(tmp_path)
    cfg, _ = compose(["algo=sft", f"model.name_or_path={path}", "model.dtype=float32"])
    stream = io.StringIO()
    plan = check_memory(cfg, stream=stream, memory_bytes=64 * 2**30)
    assert plan is not None and not plan.fits
    assert "WARNING: the run may not fit" in stream.getvalue() and "model.finetune=lora" in stream.getvalue()
    strict = replace(cfg, trainer=replace(cfg.trainer, check_memory="strict"))
    with pytest.raises(ConfigError, match="trainer.check_memory=strict"):
        check_memory(strict, stream=io.StringIO(), memory_bytes=64 * 2**30)
    assert check_memory(cfg, stream=io.StringIO(), memory_bytes=1024 * 2**30).fits


@pytest.mark.slow
def test_entry_point_refuses_before_loading_weights_and_plan_exits_1(tmp_path):
    """`python -m align ... trainer.check_memory=strict` with Llama-3-8B's config in fp32 (129 GB
    of weights, gradients and AdamW state, more than this machine's RAM) exits 2 naming the fix,
    before anything loads (the folder has no weights); `python -m align plan` exits 1 with the table."""
    path = _llama3_folder(tmp_path)
    env = dict(os.environ, ALIGN_DATA_DIR=os.environ.get("ALIGN_DATA_DIR", str(REPO.parent / "shared" / "data")))
    stories = Path(env["ALIGN_DATA_DIR"]) / "models" / "stories260K"
    args = [sys.executable, "-m", "align", "algo=sft", f"model.name_or_path={path}", f"model.tokenizer={stories}",
            "model.dtype=float32", f"output_dir={tmp_path}/run"]
    strict = subprocess.run(args + ["trainer.check_memory=strict"], check=False, capture_output=True, text=True,
                            cwd=REPO, env=env)
    assert strict.returncode == 2, strict.stderr[-2000:]
    assert "trainer.check_memory=strict" in strict.stderr and "model.finetune=lora" in strict.stderr
    plan = subprocess.run([sys.executable, "-m", "align", "plan", "algo=sft", f"model.name_or_path={path}"],
                          check=False, capture_output=True, text=True, cwd=REPO, env=env)
    assert plan.returncode == 1 and "DOES NOT FIT" in plan.stdout and "optimizer state" in plan.stdout


@pytest.mark.slow
def test_predicted_peaks_match_measured_rss_of_real_runs():
    """Real two-step runs of a ~6M-parameter random Llama: full SFT, LoRA DPO, GRPO with two Ray
    replicas (worker peaks read from /proc); every process within +-25% of the plan."""
    result = subprocess.run(
        [sys.executable, "scripts/bench_plan.py", "--only", "sft_full,dpo_lora,grpo_lora_2ranks",
         "--hidden", "256", "--layers", "6"],
        check=False, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["measured"] == 3
    assert out["max_rel_error"] <= 0.25, json.dumps(out["configs"], indent=1)


def test_a_token_budget_sizes_the_activations_and_is_the_micro_batch_fix(tmp_path):
    """With trainer.max_tokens_per_micro a packed micro-batch holds at most that many tokens,
    whatever trainer.batch_size says: the activations are the budget's, and the fix for a
    micro-batch that does not fit is a smaller budget."""
    path = _llama3_folder(tmp_path)
    base = ["algo=sft", f"model.name_or_path={path}", "trainer.batch_size=8", "data.max_length=1024"]
    rows = plan_run(compose(base)[0], device="cuda", memory_bytes=80 * 2**30).processes[0].parts
    budget = plan_run(compose([*base, "trainer.max_tokens_per_micro=2048"])[0], device="cuda", memory_bytes=80 * 2**30)
    parts = budget.processes[0].parts
    assert parts["activations"] * 4 == rows["activations"]  # 2,048 tokens against 8 x 1,024
    assert parts["logits"] * 4 == rows["logits"]
    small = plan_run(compose([*base, "trainer.max_tokens_per_micro=16384", "model.dtype=float32"])[0],
                     device="cuda", memory_bytes=80 * 2**30)
    assert any(f.startswith("trainer.max_tokens_per_micro=4096") for f in small.fixes)
