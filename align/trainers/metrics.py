"""What a run shows and keeps: a progress bar with rates, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Mapping

import torch


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item() if value.numel() else float("nan")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class RunLogger:
    """Appends one JSON line per logged step to `metrics.jsonl`, mirrors scalars to TensorBoard
    (`tb/`) and keeps a tqdm progress bar showing steps/s and the headline metrics.

    On resume from step S, lines past S (written after the checkpoint, before the crash) are
    dropped, so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, desc: str = "train", headline: tuple[str, ...] = ("loss",)):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.headline = headline
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.time()

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
        self.path.write_text("".join(l + "\n" for l in keep))

    def log(self, step: int, metrics: Mapping[str, object], *, advance: int = 0) -> None:
        row = {"step": step, "time": round(time.time() - self._t0, 3)}
        row.update({k: _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            if advance:
                self._bar.update(advance)
            shown = {k: f"{row[k]:.4g}" for k in self.headline if isinstance(row.get(k), float)}
            if shown:
                self._bar.set_postfix(shown, refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._tb.flush()
        self._tb.close()
        self._file.close()


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """All rows of a run's metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
