"""The data layer: read rows, parse them into typed examples, split, tokenize, collate.

    train, val = build_split("hh.jsonl.gz", "hh", val_size=128, on_error="skip", stats=stats)
    items = tokenize_pairs(train, tokenizer, max_length=512, max_response_length=128, stats=stats)
    batch = collate_pairs(items[:8], tokenizer.pad_token_id)
    log(stats.summary())

Every function takes explicit arguments (no config objects); one `DataStats` passed through
all stages counts rows read and skipped, truncations and drops.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from align.data.chat import FALLBACK_CHAT_TEMPLATE, chat_segments, has_chat_template, render_chat
from align.data.collate import collate_kto, collate_pairs, collate_prompts, collate_sft, left_pad, right_pad
from align.data.errors import DataError, DataStats, check_on_error
from align.data.formats import (
    FORMATS,
    ChatExample,
    Example,
    KTOExample,
    PairExample,
    PromptExample,
    SFTExample,
    get_format,
    parse_row,
    resolve_columns,
)
from align.data.packing import collate_packed, pack_sft
from align.data.sources import Row, read_rows
from align.data.split import train_val_split
from align.data.tokenize import (
    IGNORE_INDEX,
    as_sft,
    tokenize_kto,
    tokenize_pairs,
    tokenize_prompts,
    tokenize_sft,
)


def iter_examples(
    source: str | Sequence[str],
    format: str,
    *,
    columns: Mapping[str, str] | None = None,
    on_error: str = "raise",
    split: str | None = None,
    config_name: str | None = None,
    stats: DataStats | None = None,
) -> Iterator[Example]:
    """Parsed examples from one source or several, in order (see `load_examples`)."""
    check_on_error(on_error)
    fmt = get_format(format)
    cols = resolve_columns(fmt, columns)
    stats = stats if stats is not None else DataStats()
    for src in [source] if isinstance(source, str) else source:
        for row in read_rows(src, split=split, config_name=config_name, on_error=on_error, stats=stats):
            try:
                example = fmt.parse(row, cols)
            except DataError as err:
                if on_error == "raise":
                    raise
                stats.skip(err)
                continue
            stats.examples_loaded += 1
            yield example


def load_examples(
    source: str | Sequence[str],
    format: str,
    *,
    columns: Mapping[str, str] | None = None,
    on_error: str = "raise",
    limit: int | None = None,
    split: str | None = None,
    config_name: str | None = None,
    stats: DataStats | None = None,
) -> list[Example]:
    """Read `source` (a path, glob, saved dataset, hub name, or a list of them) as `format`.

    A bad row raises `DataError` naming file, line and field, or with `on_error="skip"` is
    dropped and counted in `stats.rows_skipped`. `limit` stops after that many examples.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out: list[Example] = []
    if limit == 0:
        return out
    for example in iter_examples(source, format, columns=columns, on_error=on_error, split=split,
                                 config_name=config_name, stats=stats):
        out.append(example)
        if limit is not None and len(out) >= limit:
            break
    return out


def build_split(
    source: str | Sequence[str],
    format: str,
    *,
    val_fraction: float = 0.05,
    val_size: int | None = None,
    seed: int = 0,
    val_source: str | Sequence[str] | None = None,
    columns: Mapping[str, str] | None = None,
    on_error: str = "raise",
    limit: int | None = None,
    split: str | None = None,
    stats: DataStats | None = None,
) -> tuple[list[Example], list[Example]]:
    """(train, val) examples: a deterministic split of `source` (`val_size` wins over
    `val_fraction`; see `train_val_split`), or all of `source` and all of `val_source`."""
    kw = dict(columns=columns, on_error=on_error, split=split, stats=stats)
    examples = load_examples(source, format, limit=limit, **kw)
    if val_source is not None:
        return examples, load_examples(val_source, format, **kw)
    if val_size is not None:
        return train_val_split(examples, val_size=min(val_size, len(examples)), seed=seed)
    return train_val_split(examples, val_fraction=val_fraction, seed=seed)


__all__ = [
    "FALLBACK_CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX",
    "ChatExample", "DataError", "DataStats", "Example", "KTOExample", "PairExample", "PromptExample",
    "Row", "SFTExample",
    "as_sft", "build_split", "chat_segments", "collate_kto", "collate_pairs", "collate_prompts",
    "collate_packed", "collate_sft", "get_format", "has_chat_template", "iter_examples", "left_pad", "load_examples",
    "pack_sft", "parse_row", "read_rows", "render_chat", "right_pad", "tokenize_kto", "tokenize_pairs",
    "tokenize_prompts", "tokenize_sft", "train_val_split",
]
