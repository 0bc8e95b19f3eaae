"""Fixtures for the rollout tests: stories260K (real, pretrained) and a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from align.models import build_tiny_llama, load_model_and_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is fastest, and avoids spinning against busy CI cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def stories(stories_path):
    """(model, tokenizer) of the pretrained stories260K, fp32, eval mode."""
    model, tok = load_model_and_tokenizer(stories_path)
    return model.eval(), tok


@pytest.fixture(scope="session")
def prompts(stories):
    _, tok = stories
    texts = ["Once upon a time", "The little dog ran to the big red", "Tom"]
    return [tok(t).input_ids for t in texts]


@pytest.fixture()
def tiny():
    """A fresh tiny random Llama (vocab 512, so the stories tokenizer decodes it)."""
    return build_tiny_llama(seed=0, hidden_size=64, num_layers=2, num_heads=2)
