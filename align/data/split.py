"""A deterministic train/validation split that does not depend on process or hash seed.

Each item gets a score `sha1(f"{seed}:{key(item)}")`; the `val_size` items with the smallest
scores form the validation set. So:

- the same items and seed give the same split in any process, on any machine, in any order;
- identical items (same key) always land on the same side, so no duplicate leaks from training
  into validation (if duplicates straddle the cut, all of them go to training and validation
  is that much smaller than asked).

Both halves keep the input order. The default key is the item's content (a dataclass or
dict serialised as sorted JSON, a string as itself); pass `key` for a stable id instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def content_key(item: Any) -> str:
    """A stable text for `item`: sorted JSON of a dataclass or dict, the string itself, or repr."""
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        item = dataclasses.asdict(item)
    if isinstance(item, str):
        return item
    try:
        return json.dumps(item, sort_keys=True, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        return repr(item)


def train_val_split(
    items: Sequence[T],
    *,
    val_fraction: float | None = None,
    val_size: int | None = None,
    seed: int = 0,
    key: Callable[[T], str] = content_key,
) -> tuple[list[T], list[T]]:
    """Split `items` into (train, val); give exactly one of `val_fraction` or `val_size`.

    `val_fraction` gives round(fraction * n) validation items, at least 1 when the fraction is
    positive and there are at least 2 items.
    """
    n = len(items)
    if (val_fraction is None) == (val_size is None):
        raise ValueError("give exactly one of val_fraction or val_size")
    if val_fraction is not None:
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        val_size = round(val_fraction * n)
        if val_fraction > 0 and n >= 2:
            val_size = max(val_size, 1)
    if val_size < 0 or val_size > n:
        raise ValueError(f"val_size must be in [0, {n}] for {n} items, got {val_size}")
    scores = [hashlib.sha1(f"{seed}:{key(x)}".encode()).hexdigest() for x in items]
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    chosen = ranked[:val_size]
    if 0 < val_size < n and scores[ranked[val_size]] == scores[chosen[-1]]:
        chosen = [i for i in chosen if scores[i] != scores[chosen[-1]]]  # keep duplicates together
    in_val = set(chosen)
    train = [x for i, x in enumerate(items) if i not in in_val]
    val = [x for i, x in enumerate(items) if i in in_val]
    return train, val
