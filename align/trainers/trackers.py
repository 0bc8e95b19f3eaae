"""Experiment trackers behind one small interface: TensorBoard, Weights & Biases, MLflow, trackio.

`trainer.loggers` names them; metrics.jsonl is always written besides (align/trainers/metrics.py).
Each tracker is built with the run's identity (`RunInfo`) and the state it saved last time, so a
resumed run (same output_dir, continuing from a checkpoint) writes into the same tracker run:
W&B by run id with `resume="allow"`, MLflow by run id, trackio by run name, TensorBoard by purging
the events past the checkpoint. That state lives in `<output_dir>/tracking.json`, with the git
commit of the code.

Nothing here reaches the network by itself: W&B honours WANDB_MODE=offline, MLflow logs wherever
MLFLOW_TRACKING_URI points (a local `file:` or `sqlite:` store), trackio logs to a local SQLite
file unless a Space is named.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

# name -> (module that must import, pip extra that installs it); jsonl needs nothing.
LOGGER_PACKAGES = {
    "jsonl": None,
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


def check_loggers(loggers) -> None:
    """Fail at start-up, naming the key, on an unknown logger or one whose package is missing."""
    from align.config import ConfigError

    for name in loggers:
        if name not in LOGGER_PACKAGES:
            raise ConfigError(f"trainer.loggers: {name!r} is not one of {list(LOGGER_PACKAGES)}")
        need = LOGGER_PACKAGES[name]
        if need is not None and importlib.util.find_spec(need[0]) is None:
            raise ConfigError(f"trainer.loggers: {name!r} needs the {need[0]} package: pip install 'align[{need[1]}]'")


def git_commit(checkout: str | os.PathLike | None = None) -> str:
    """`git rev-parse HEAD` of the checkout holding this code (or `checkout`); "unknown" when it
    is not a git checkout (an installed package), or git is missing."""
    from align.config import REPO_ROOT

    root = Path(checkout) if checkout is not None else REPO_ROOT
    if not (root / ".git").exists():  # a directory, or a file in a worktree
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


@dataclass
class RunInfo:
    """Who the run is, as every tracker names it.

    name: the run's display name; project: W&B project / MLflow experiment / trackio project;
    group: W&B group (a tag elsewhere); job_type: the trainer (sft, dpo/sigmoid, grpo, ...);
    config: the resolved run config (config.json) plus `git_commit`; resumed: continuing from a
    checkpoint at `start_step` (a tracker then reattaches to the run in `state`).
    """

    output_dir: Path
    name: str
    project: str = "align"
    group: str | None = None
    job_type: str | None = None
    tags: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)
    start_step: int = 0

    @property
    def resumed(self) -> bool:
        return self.start_step > 0


class Tracker:
    """One destination for a run's scalars. `state()` is saved to tracking.json and handed back
    as `state` when the run resumes."""

    def __init__(self, run: RunInfo, state: Mapping[str, Any]):
        self.run = run

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Events in `<output_dir>/tb`; on resume, events past the checkpoint are purged."""

    def __init__(self, run: RunInfo, state: Mapping[str, Any]):
        super().__init__(run, state)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.output_dir / "tb"), purge_step=run.start_step + 1 if run.resumed else None)
        shown = json.dumps(run.config, indent=1, default=str)
        self.writer.add_text("config", f"```\n{shown}\n```", run.start_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run; its id is kept so a resumed run continues it (`resume="allow"`).

    Files go to $WANDB_DIR if set, else `<output_dir>/wandb`; WANDB_MODE=offline keeps them local
    (`wandb sync` uploads later). On resume W&B keeps the steps it already has: steps logged after
    the checkpoint and before a crash are not overwritten by the rerun of those steps.
    """

    def __init__(self, run: RunInfo, state: Mapping[str, Any]):
        super().__init__(run, state)
        import wandb

        run_id = state.get("id") if run.resumed else None
        self.wb = wandb.init(
            project=run.project, name=run.name, group=run.group, job_type=run.job_type, tags=list(run.tags) or None,
            config=run.config, id=run_id, resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else str(run.output_dir),
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.wb.log(dict(metrics), step=step)

    def state(self) -> dict:
        return {"id": self.wb.id}

    def close(self) -> None:
        self.wb.finish()


def mlflow_key(key: str) -> str:
    """MLflow accepts letters, digits and `_-. /:` in metric names: `eval/pass@4` -> `eval/pass_at_4`."""
    return re.sub(r"[^\w\-. /:]", "_", key.replace("@", "_at_"))


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[mlflow_key(f"{prefix}{key}")] = json.dumps(value, default=str)[:6000]
    return flat


class MlflowTracker(Tracker):
    """An MLflow run in experiment `project`, at MLFLOW_TRACKING_URI (MLflow's default otherwise).

    The flattened config goes in as params (once: MLflow refuses to change a param, so a resumed
    run keeps the first values) and whole as the `config.json` artifact; the git commit as MLflow's
    `mlflow.source.git.commit` tag. A resumed run reopens the stored run id at the stored URI.
    """

    def __init__(self, run: RunInfo, state: Mapping[str, Any]):
        super().__init__(run, state)
        import mlflow
        from mlflow.tracking import MlflowClient

        resume = run.resumed and state.get("run_id")
        self.uri = state["tracking_uri"] if resume else mlflow.get_tracking_uri()
        self.client = MlflowClient(self.uri)
        if resume:
            self.run_id = state["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(run.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
        tags = {"mlflow.source.git.commit": str(run.config.get("git_commit", "unknown"))}
        tags.update({t: "true" for t in run.tags})
        tags.update({k: v for k, v in (("group", run.group), ("job_type", run.job_type)) if v})
        self.run_id = self.client.create_run(experiment_id, run_name=run.name, tags=tags).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v) for k, v in _flatten(run.config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, run.config, "config.json")

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), v, now, step) for k, v in metrics.items()])

    def state(self) -> dict:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker(Tracker):
    """A trackio run (local SQLite under $TRACKIO_DIR unless a Space is configured); trackio
    identifies runs by name, so a resumed run reattaches by its stored name."""

    def __init__(self, run: RunInfo, state: Mapping[str, Any]):
        super().__init__(run, state)
        import trackio

        resume = run.resumed and state.get("name")
        self.trackio = trackio
        self.tr = trackio.init(project=run.project, name=state["name"] if resume else run.name, group=run.group,
                               config=run.config, resume="must" if resume else "never", embed=False)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.tr.log(dict(metrics), step=step)

    def state(self) -> dict:
        return {"name": self.tr.name}

    def close(self) -> None:
        self.tr.finish()


TRACKERS: dict[str, type[Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}


def open_trackers(names, run: RunInfo) -> list[Tracker]:
    """Build the named trackers, reattaching to the runs in tracking.json when `run.resumed`, and
    rewrite tracking.json with the git commit and every tracker's state."""
    path = run.output_dir / "tracking.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    previous = saved.get("trackers", {}) if run.resumed else {}
    trackers = {name: TRACKERS[name](run, previous.get(name, {})) for name in names if name != "jsonl"}
    record = {"run_name": run.name, "project": run.project, "group": run.group,
              "git_commit": run.config.get("git_commit", "unknown"),
              "trackers": {**previous, **{name: t.state() for name, t in trackers.items()}}}
    path.write_text(json.dumps(record, indent=1))
    return list(trackers.values())
