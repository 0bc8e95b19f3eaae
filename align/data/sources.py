"""Read raw rows (dicts) from local files, local Hugging Face datasets or hub names.

`read_rows(source)` picks the reader from what `source` is:

- a `.jsonl` / `.jsonl.gz` file: one JSON object per line; `Row.line` is the real 1-based line
  number (blank lines are skipped but still counted, so numbers match an editor);
- a `.json` file: a list of objects, or `{"data": [...]}`;
- a `.parquet` file (read in record batches with pyarrow);
- a folder written by `datasets.save_to_disk` (a `DatasetDict` gives `split`, default "train");
- a folder of data files: every supported file in it, sorted by name; with `split`, only the
  files whose name has `split` as a `-`/`_`/`.`-separated token (`train.jsonl`,
  `harmless-base_test.jsonl.gz`, `train-00000-of-00002.parquet`);
- a glob pattern (`data/*.jsonl.gz`);
- anything else is a hub name, loaded with `datasets.load_dataset(name, config_name, split=...)`.

Outside jsonl `Row.line` is the 1-based record number. `datasets` and `pyarrow` are imported
only when a source needs them.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from align.data.errors import DataError, DataStats, check_on_error

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")


@dataclass(frozen=True, slots=True)
class Row:
    """One raw record: where it came from (`origin`, `line`) and its fields (`data`)."""

    origin: str
    line: int
    data: dict[str, Any]


def read_rows(
    source: str,
    *,
    split: str | None = None,
    config_name: str | None = None,
    on_error: str = "raise",
    stats: DataStats | None = None,
) -> Iterator[Row]:
    """Yield every row of `source` (see the module docstring for what `source` may be).

    A jsonl line that is not a JSON object raises `DataError` naming file and line, or with
    `on_error="skip"` is counted in `stats.rows_skipped["invalid_json"]`. `stats.rows_read`
    counts every row seen, bad ones included.
    """
    check_on_error(on_error)
    stats = stats if stats is not None else DataStats()
    for row in _dispatch(str(source), split, config_name, on_error, stats):
        stats.rows_read += 1
        yield row


def _dispatch(source, split, config_name, on_error, stats) -> Iterator[Row]:
    if os.path.isdir(source):
        if _is_saved_dataset(source):
            yield from _read_saved_dataset(source, split)
        else:
            files = _select_split(_data_files(source), split, source)
            for path in files:
                yield from _read_file(path, on_error, stats)
    elif os.path.isfile(source):
        yield from _read_file(source, on_error, stats)
    elif glob.has_magic(source):
        files = sorted(p for p in glob.glob(source) if p.endswith(DATA_SUFFIXES))
        if not files:
            raise FileNotFoundError(f"no data files match {source!r} (supported: {DATA_SUFFIXES})")
        for path in _select_split(files, split, source):
            yield from _read_file(path, on_error, stats)
    elif source.endswith(DATA_SUFFIXES) or source.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"no such data file or folder: {source!r}")
    else:
        yield from _read_hub(source, split, config_name)


def _read_file(path: str, on_error: str, stats: DataStats) -> Iterator[Row]:
    if path.endswith((".jsonl", ".jsonl.gz")):
        yield from _read_jsonl(path, on_error, stats)
    elif path.endswith(".json"):
        yield from _read_json(path)
    elif path.endswith(".parquet"):
        yield from _read_parquet(path)
    else:
        raise ValueError(f"{path}: unsupported file type; supported: {DATA_SUFFIXES}")


def _read_jsonl(path: str, on_error: str, stats: DataStats) -> Iterator[Row]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
                if not isinstance(data, dict):
                    raise DataError(path, lineno, None, f"expected a JSON object, got {type(data).__name__}", "invalid_json")
            except json.JSONDecodeError as e:
                err = DataError(path, lineno, None, f"not valid JSON ({e.msg} at column {e.colno})", "invalid_json")
                if on_error == "raise":
                    raise err from None
                stats.rows_read += 1
                stats.skip(err)
                continue
            except DataError as err:
                if on_error == "raise":
                    raise
                stats.rows_read += 1
                stats.skip(err)
                continue
            yield Row(path, lineno, data)


def _read_json(path: str) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, None, f"not valid JSON ({e.msg} at column {e.colno})", "invalid_json") from None
    records = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        raise DataError(path, 1, None, 'expected a list of objects or {"data": [...]}', "invalid_json")
    for i, data in enumerate(records, start=1):
        if not isinstance(data, dict):
            raise DataError(path, i, None, f"expected a JSON object, got {type(data).__name__}", "invalid_json")
        yield Row(path, i, data)


def _read_parquet(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for data in batch.to_pylist():
            n += 1
            yield Row(path, n, data)


def _is_saved_dataset(path: str) -> bool:
    names = set(os.listdir(path))
    return "dataset_dict.json" in names or {"dataset_info.json", "state.json"} <= names


def _read_saved_dataset(path: str, split: str | None) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(path)
    origin = path
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise KeyError(f"{path}: no split {name!r}; available: {sorted(ds)}")
        ds, origin = ds[name], f"{path}[{name}]"
    for i, data in enumerate(ds, start=1):
        yield Row(origin, i, data)


def _read_hub(name: str, split: str | None, config_name: str | None) -> Iterator[Row]:
    import datasets

    split = split or "train"
    ds = datasets.load_dataset(name, config_name, split=split)
    origin = f"{name}[{split}]"
    for i, data in enumerate(ds, start=1):
        yield Row(origin, i, data)


def _data_files(folder: str) -> list[str]:
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(DATA_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{folder}: no data files (supported: {DATA_SUFFIXES})")
    return files


def _select_split(files: list[str], split: str | None, source: str) -> list[str]:
    if split is None:
        return files
    chosen = [p for p in files if split in re.split(r"[-_.]", os.path.basename(p))]
    if not chosen:
        names = [os.path.basename(p) for p in files]
        raise FileNotFoundError(f"{source}: no file for split {split!r} among {names}")
    return chosen
