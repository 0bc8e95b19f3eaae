"""What a run shows and keeps: a progress bar with rates, metrics.jsonl, and the trackers named
by `trainer.loggers` (TensorBoard, W&B, MLflow, trackio: align/trainers/trackers.py)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from align.trainers.trackers import RunInfo, git_commit, open_trackers

if TYPE_CHECKING:
    from align.config import TrainerConfig


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.detach().float().mean().item() if value.numel() else float("nan")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


class RunLogger:
    """Appends one JSON line per logged step to `metrics.jsonl`, sends the finite scalars to the
    trackers of `trainer.loggers` (TensorBoard in `tb/` when no trainer config is given) and
    keeps a tqdm progress bar showing steps/s and the headline metrics.

    `started` (time.perf_counter() at the start of the trainer's `train()`) adds
    `time_to_first_step` to the first step this process logs: the seconds from the start to the end
    of that step (its evaluation included when it has one), i.e. model and data loading, any
    start-up pass (DPO's reference log-probs) and the step-0 evaluation. On resume it is the
    first step after the checkpoint.

    On resume from step S, lines past S (written after the checkpoint, before the crash) are
    dropped, so the file reads as one uninterrupted run; the trackers reattach to their runs.
    The trackers get the resolved config the trainer wrote (config.json) and the git commit.
    """

    def __init__(self, output_dir: str | os.PathLike, *, total_steps: int, start_step: int = 0,
                 progress: bool = True, desc: str = "train", headline: tuple[str, ...] = ("loss",),
                 trainer: TrainerConfig | None = None, started: float | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._truncate_after(start_step)
        self._file = open(self.path, "a", buffering=1)
        self._trackers = open_trackers(trainer.loggers if trainer else ("jsonl", "tensorboard"),
                                       self._run_info(trainer, desc, start_step))
        self.headline = headline
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                             dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.time()
        self._started = started  # None once time_to_first_step is logged

    def _run_info(self, trainer: TrainerConfig | None, desc: str, start_step: int) -> RunInfo:
        config_file = self.dir / "config.json"
        config = json.loads(config_file.read_text()) if config_file.exists() else {}
        config["git_commit"] = git_commit()
        return RunInfo(self.dir, name=(trainer and trainer.run_name) or self.dir.resolve().name,
                       project=trainer.project if trainer else "align", group=trainer and trainer.group,
                       job_type=desc, tags=tuple(trainer.tags) if trainer else (), config=config,
                       start_step=start_step)

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
        if advance and self._started is not None:
            row["time_to_first_step"] = round(time.perf_counter() - self._started, 3)
            self._started = None
        self._file.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, float) and math.isfinite(v)}
        for tracker in self._trackers:
            tracker.log(step, scalars)
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
        for tracker in self._trackers:
            tracker.close()
        self._file.close()


class NullLogger:
    """What a data-parallel replica other than rank 0 logs: nothing (rank 0 writes the run's
    metrics, progress and trackers). Same methods as `RunLogger`."""

    def log(self, step: int, metrics: Mapping[str, object], *, advance: int = 0) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def run_logger(output_dir: str | os.PathLike, **kwargs) -> "RunLogger | NullLogger":
    """A `RunLogger` on rank 0 (or without replicas), a `NullLogger` on the other replicas."""
    from align.engine import distributed

    return RunLogger(output_dir, **kwargs) if distributed.is_main() else NullLogger()


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """All rows of a run's metrics.jsonl."""
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
