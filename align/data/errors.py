"""Bad-row errors that name file, line and field, and the counters every data stage reports.

Every reader and parser either raises `DataError` on a bad row or, when the caller passes
`on_error="skip"`, drops the row and counts it in `DataStats.rows_skipped` under a short
reason (`invalid_json`, `missing_field`, `wrong_type`, ...). The first few skipped rows are
also logged with their full message, so a user who skips still sees why.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger("align.data")

ON_ERROR = ("raise", "skip")
_LOGGED_SKIPS = 5  # full messages logged per DataStats before going quiet


def location(origin: str, line: int) -> str:
    """`hh.jsonl.gz, line 17` for jsonl files (a real line number), `x.parquet, record 3` else."""
    unit = "line" if origin.endswith((".jsonl", ".jsonl.gz")) else "record"
    return f"{origin}, {unit} {line}"


class DataError(ValueError):
    """A bad row: `hh.jsonl.gz, line 17, field 'chosen': missing`.

    `origin` is the file path (or hub name), `line` the 1-based line of a jsonl file or the
    1-based record number elsewhere, `field` the column name as spelled in the data (None when
    the whole row is bad), `reason` a short key used to count skipped rows.
    """

    def __init__(self, origin: str, line: int, field: str | None, problem: str, reason: str = "bad_row"):
        self.origin, self.line, self.field, self.problem, self.reason = origin, line, field, problem, reason
        where = location(origin, line)
        super().__init__(f"{where}, field {field!r}: {problem}" if field is not None else f"{where}: {problem}")


@dataclass
class DataStats:
    """Counters shared by reading, parsing and tokenizing; pass one object through all stages.

    rows_read: rows seen in the sources (blank jsonl lines excluded), bad ones included.
    rows_skipped: bad rows dropped under `on_error="skip"`, by reason.
    examples_loaded: rows parsed into typed examples.
    prompts_truncated: examples whose prompt was left-truncated to fit.
    responses_truncated: responses cut at `max_response_length` (their EOS is cut too).
    examples_dropped_overlong: examples dropped because they could not be made to fit.
    examples_tokenized: examples that came out of a tokenize_* call.
    """

    rows_read: int = 0
    rows_skipped: Counter = field(default_factory=Counter)
    examples_loaded: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    examples_dropped_overlong: int = 0
    examples_tokenized: int = 0

    def skip(self, err: DataError) -> None:
        self.rows_skipped[err.reason] += 1
        if sum(self.rows_skipped.values()) <= _LOGGED_SKIPS:
            logger.warning("skipping bad row: %s", err)

    def as_dict(self) -> dict[str, int]:
        """Flat counters for a metrics log: `rows_skipped` is the total, `rows_skipped/<reason>` each."""
        out = {"rows_read": self.rows_read, "rows_skipped": sum(self.rows_skipped.values())}
        out.update({f"rows_skipped/{k}": v for k, v in sorted(self.rows_skipped.items())})
        out.update(
            examples_loaded=self.examples_loaded,
            prompts_truncated=self.prompts_truncated,
            responses_truncated=self.responses_truncated,
            examples_dropped_overlong=self.examples_dropped_overlong,
            examples_tokenized=self.examples_tokenized,
        )
        return out

    def summary(self) -> str:
        """One line for a log: `data: 5803 rows read, 14 skipped (hh_prefix_mismatch=14), ...`."""
        skipped = sum(self.rows_skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.rows_skipped.items()))
        return (
            f"data: {self.rows_read} rows read, {skipped} skipped" + (f" ({reasons})" if reasons else "")
            + f", {self.examples_loaded} loaded; {self.examples_tokenized} tokenized, "
            f"{self.prompts_truncated} prompts truncated, {self.responses_truncated} responses truncated, "
            f"{self.examples_dropped_overlong} dropped as over-long"
        )


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
