"""Deterministic train/validation split: same input and seed, same split, in any process."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from align.data import PairExample, build_split, train_val_split

ITEMS = [f"item {i}" for i in range(200)]


def test_same_input_same_split_and_order_does_not_matter():
    train, val = train_val_split(ITEMS, val_size=20, seed=3)
    assert (train, val) == train_val_split(ITEMS, val_size=20, seed=3)
    assert len(val) == 20 and len(train) == 180 and set(train) | set(val) == set(ITEMS)
    assert train == [x for x in ITEMS if x in set(train)]  # input order kept
    shuffled = ITEMS[:]
    random.Random(0).shuffle(shuffled)
    assert set(train_val_split(shuffled, val_size=20, seed=3)[1]) == set(val)
    assert set(train_val_split(ITEMS, val_size=20, seed=4)[1]) != set(val)


def test_val_fraction_rounding():
    assert len(train_val_split(ITEMS, val_fraction=0.05)[1]) == 10
    assert len(train_val_split(ITEMS[:3], val_fraction=0.01)[1]) == 1  # a positive fraction gives >= 1
    assert train_val_split(ITEMS, val_fraction=0.0) == (ITEMS, [])
    for bad in (dict(), dict(val_size=1, val_fraction=0.1), dict(val_fraction=1.0), dict(val_size=201)):
        with pytest.raises(ValueError):
            train_val_split(ITEMS, **bad)


def test_duplicates_never_straddle():
    items = [f"dup {i % 30}" for i in range(300)]  # each text 10 times
    for seed in range(5):
        for size in (1, 7, 15, 55, 100):
            train, val = train_val_split(items, val_size=size, seed=seed)
            assert not set(train) & set(val)
            assert len(val) <= size and len(val) % 10 == 0 and len(train) + len(val) == 300


def test_dataclasses_keyed_by_content():
    pairs = [PairExample(f"p{i}", "a", "b") for i in range(50)]
    copies = [PairExample(f"p{i}", "a", "b") for i in range(50)]
    assert train_val_split(pairs, val_size=5) == train_val_split(copies, val_size=5)


def test_independent_of_process_and_hash_seed():
    """A fresh process with a fixed hash seed agrees with this one (whose seed is random)."""
    code = (
        "import json, sys; from align.data import train_val_split, PairExample; "
        "items = [PairExample(f'p{i}', 'a', {'k': i}) for i in range(100)]; "
        "print(json.dumps([x.prompt for x in train_val_split(items, val_size=10, seed=7)[1]])); "
        "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    lines = out.stdout.splitlines()
    items = [PairExample(f"p{i}", "a", {"k": i}) for i in range(100)]
    assert json.loads(lines[0]) == [x.prompt for x in train_val_split(items, val_size=10, seed=7)[1]]
    assert lines[1] == "[]"  # importing align.data loads none of the slow libraries


def test_build_split_on_real_hh(hh_files, tmp_path, write_jsonl):
    src = str(hh_files[1])
    train, val = build_split(src, "hh", val_size=128, on_error="skip", seed=1)
    assert len(val) == 128 and len(train) + len(val) == 2354 - 9
    assert (train, val) == build_split(src, "hh", val_size=128, on_error="skip", seed=1)
    val_texts = {(p.prompt, p.chosen, p.rejected) for p in val}
    assert not any((p.prompt, p.chosen, p.rejected) in val_texts for p in train)
    train, val = build_split(src, "hh", val_fraction=0.1, on_error="skip")
    assert len(val) == round(0.1 * 2345) or len(val) < round(0.1 * 2345)  # fewer only if duplicates straddle
    other = write_jsonl(tmp_path / "v.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}])
    train, val = build_split(src, "hh", val_source=other, on_error="skip", limit=10)
    assert len(train) == 10 and val == [PairExample("\n\nHuman: a\n\nAssistant:", " b", " c")]
