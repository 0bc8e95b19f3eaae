"""Fixtures for the model tests: stories260K loaded fresh per test, a padded batch, adapter noise."""

from __future__ import annotations

import pytest
import torch

TEXTS = [
    "Once upon a time there was a little dog named Tim.",
    "Lily liked to play in the park with her ball.",
    "The sun was hot.",
]


@pytest.fixture
def stories_base(stories_path):
    """A fresh fp32 stories260K causal LM (the multi-head model takes its base over in place)."""
    from align.models import load_causal_lm

    return load_causal_lm(stories_path).eval()


@pytest.fixture(scope="session")
def stories_tokenizer(stories_path):
    from align.models import load_tokenizer

    return load_tokenizer(stories_path)


@pytest.fixture(scope="session")
def batch(stories_tokenizer):
    """Right-padded (B=3, T) input_ids and attention_mask of three stories of different lengths."""
    enc = stories_tokenizer(TEXTS, return_tensors="pt", padding=True)
    assert (enc.attention_mask == 0).any(), "the batch must contain padding"
    return enc.input_ids, enc.attention_mask


@pytest.fixture
def perturb():
    """Give every LoRA B matrix (zero at init) random values, so each role computes a different function."""

    def _perturb(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in module.named_parameters():
                if ".lora_B." in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)

    return _perturb


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices gain nothing from threads, and on busy shared cores two spinning OpenMP
    threads made every linear layer ~100x slower; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
