"""Shared fixtures: the shipped data and model (../shared/data), and small-run helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from align.config import shared_data_dir

SHARED = Path(shared_data_dir())
STORIES = SHARED / "models" / "stories260K"
HH_HELPFUL = SHARED / "hh-rlhf" / "helpful-base_test.jsonl.gz"
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"

# Two cores in CI: keep torch from oversubscribing them when tests spawn subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.exists():
        pytest.fail(f"shared data not found at {SHARED}; set ALIGN_DATA_DIR")
    return SHARED


@pytest.fixture(scope="session")
def stories_path(shared_data) -> str:
    return str(STORIES)
