"""Trackers for real, offline: a tiny SFT run logs to W&B (offline files), MLflow (a local file
store), TensorBoard and trackio (a local SQLite file); each tracker's copy of the metrics is read
back with the tracker's own reader and compared with metrics.jsonl, and a resumed run (same
output_dir, continued from its step-3 checkpoint) writes into the same tracker run."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from align.config import ConfigError, compose
from align.trainers import run
from align.trainers.metrics import read_metrics
from align.trainers.trackers import check_loggers, git_commit, mlflow_key

SMALL = [
    "data.limit=64", "data.val_size=8", "data.max_length=64", "data.max_prompt_length=48",
    "data.max_response_length=16", "trainer.batch_size=4", "trainer.eval_batches=2", "trainer.eval_every=2",
    "trainer.progress=false", "trainer.num_threads=1", "trainer.warmup_steps=1", "trainer.save_every=3",
]


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))


def _sft(out, loggers: str, max_steps: int):
    import torch

    threads = torch.get_num_threads()
    cfg, raw = compose([*SMALL, f"output_dir={out}", f"trainer.loggers={loggers}", f"trainer.max_steps={max_steps}",
                        "trainer.project=align-tests", "trainer.group=trackers", "trainer.tags=[tiny]"])
    try:
        return run(cfg, raw)
    finally:
        torch.set_num_threads(threads)


def _expected(out) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {step: value}}, finite numbers only (what trackers receive)."""
    expected: dict[str, dict[int, float]] = {}
    for row in read_metrics(out):
        for key, value in row.items():
            if key != "step" and isinstance(value, float) and math.isfinite(value):
                expected.setdefault(key, {})[row["step"]] = value
    return expected


def _wandb_records(run_dir) -> list[dict]:
    """The records of one offline run, decoded by wandb's own reader (`wandb leet inspect`)."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_wandb_and_mlflow_read_back_equal_metrics_jsonl_and_a_resumed_run_continues_them(tmp_path, offline):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    loggers = "[jsonl,tensorboard,wandb,mlflow]"
    _sft(out, loggers, max_steps=3)
    first = json.loads((out / "tracking.json").read_text())
    _sft(out, loggers, max_steps=5)  # resumes from the step-3 checkpoint
    second = json.loads((out / "tracking.json").read_text())
    assert second["trackers"] == first["trackers"]
    assert second["git_commit"] == git_commit() != "unknown"  # the tests run from a git checkout
    expected = _expected(out)
    assert sorted(expected["loss"]) == [1, 2, 3, 4, 5] and sorted(expected["val_loss"]) == [0, 2, 3, 4, 5]

    # W&B: the resumed process wrote a second offline folder for the same run id (W&B merges them
    # on `wandb sync`); together they hold every row of metrics.jsonl and the run's identity.
    run_id = first["trackers"]["wandb"]["id"]
    folders = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 2, list((out / "wandb").iterdir())
    logged: dict[str, dict[int, float]] = {}
    for folder in folders:
        records = _wandb_records(folder)
        header = next(r["run"] for r in records if r["type"] == "run")
        assert (header["run_id"], header["display_name"], header["project"], header["run_group"]) == (
            run_id, "run", "align-tests", "trackers")
        config = header["config"]["update"]
        assert config["trainer"]["loggers"] == ["jsonl", "tensorboard", "wandb", "mlflow"]
        assert config["git_commit"] == git_commit()
        for r in records:
            if r["type"] == "history":
                step = r["history"]["step"]["num"]
                for key, value in r["history"]["item"].items():
                    if not key.startswith("_"):
                        logged.setdefault(key, {})[step] = value
    assert logged == expected

    # MLflow: one run in the experiment, reopened on resume, every metric's history equal.
    client = MlflowClient(first["trackers"]["mlflow"]["tracking_uri"])
    experiment = client.get_experiment_by_name("align-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [first["trackers"]["mlflow"]["run_id"]]
    mlrun = runs[0]
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["trainer.max_steps"] == "3"  # the first config's params stay
    assert mlrun.data.tags["mlflow.source.git.commit"] == git_commit()
    assert mlrun.data.tags["group"] == "trackers" and mlrun.data.tags["tiny"] == "true"
    for key, values in expected.items():
        history = client.get_metric_history(mlrun.info.run_id, mlflow_key(key))
        assert {m.step: m.value for m in history} == values, key
        assert len(history) == len(values), key  # nothing logged twice


@pytest.mark.slow
def test_trackio_reads_back_equal_metrics_jsonl_and_a_resumed_run_continues_it(tmp_path, offline):
    trackio = pytest.importorskip("trackio")
    # trackio reads TRACKIO_DIR once, on import: this test must be the first to import it
    assert trackio.utils.TRACKIO_DIR == tmp_path / "trackio"
    out = tmp_path / "run"
    _sft(out, "[jsonl,trackio]", max_steps=3)
    first = json.loads((out / "tracking.json").read_text())
    _sft(out, "[jsonl,trackio]", max_steps=5)
    assert json.loads((out / "tracking.json").read_text())["trackers"] == first["trackers"]
    from trackio import SQLiteStorage

    name = first["trackers"]["trackio"]["name"]
    assert SQLiteStorage.get_runs("align-tests") == [name]
    logged: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs("align-tests", name):
        for key, value in row.items():
            if key not in ("step", "timestamp") and isinstance(value, float):
                key = key.removeprefix("__")  # trackio stores its reserved key `time` as `__time`
                logged.setdefault(key, {})[row["step"]] = value
    assert logged == _expected(out)


def test_tensorboard_alone_is_the_default_and_records_the_config(tmp_path):
    out = tmp_path / "run"
    _sft(out, "[jsonl,tensorboard]", max_steps=2)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx(_expected(out)["loss"])  # float32
    assert "config/text_summary" in events.Tags()["tensors"]
    assert compose([])[0].trainer.loggers == ["jsonl", "tensorboard"]


def test_git_commit_is_the_checkouts_head_or_unknown(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert git_commit() == head
    assert git_commit(tmp_path) == "unknown"  # not a checkout (as for an installed package)


def test_loggers_are_checked_at_start_up():
    with pytest.raises(ConfigError, match=r"trainer.loggers: 'wandbb' is not one of"):
        compose(["trainer.loggers=[jsonl,wandbb]"])
    check_loggers(["jsonl"])
    assert mlflow_key("eval/pass@4") == "eval/pass_at_4"


def test_pipeline_stages_log_where_the_pipeline_does_grouped_under_its_name(tmp_path):
    from align.pipeline import _stage_overrides

    cfg, _ = compose(["algo=pipeline", "trainer.loggers=[jsonl,wandb]", "trainer.project='my \\'proj'",
                      "trainer.tags=[a,b c]"])
    stage, _ = compose(_stage_overrides(cfg, "sft", tmp_path / "pipe-1", {}))
    assert (stage.algo.name, stage.output_dir) == ("sft", str(tmp_path / "pipe-1" / "sft"))
    assert stage.trainer.loggers == ["jsonl", "wandb"] and stage.trainer.project == "my 'proj"
    assert stage.trainer.group == "pipe-1" and stage.trainer.tags == ["a", "b c"]
    named, _ = compose(["algo=pipeline", "trainer.run_name=nightly"])
    assert compose(_stage_overrides(named, "rm", tmp_path, {}))[0].trainer.group == "nightly"
