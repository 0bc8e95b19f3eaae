"""`python -m align.plot`: two hand-written runs overlaid, one subplot per metric, by step or by
samples seen."""

import json

import pytest

from align.plot import main, plot_runs


def _write_run(path, rows, config=None, name=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    if name is not None:
        (path / "tracking.json").write_text(json.dumps({"run_name": name}))


@pytest.fixture
def two_runs(tmp_path):
    # An RL run logging `samples` (8 completions a step), and one that does not: its samples per step
    # come from config.json (batch_size 4 x grad_accum 2 = 8).
    grpo = [{"step": 0, "time": 0.1, "eval/reward": 0.1, "eval/pass@4": 0.2}]
    grpo += [{"step": s, "time": s, "reward/mean": 0.1 * s, "actor/approx_kl": 0.01 * s, "actor/loss": -s,
              "samples": 8.0, "time/generate": 0.5, "time/update": 0.25, "actor/lr": 1e-3} for s in (1, 2, 3)]
    grpo.append({"step": 3, "eval/reward": 0.4, "eval/pass@4": 0.5, "loss": float("nan")})
    gspo = [{"step": 0, "eval/reward": 0.1}]
    gspo += [{"step": s, "reward/mean": 0.2 * s, "actor/approx_kl": 0.02 * s, "time/generate": 0.4} for s in (1, 2)]
    a, b = tmp_path / "runs" / "grpo", tmp_path / "runs" / "gspo"
    _write_run(a, grpo, name="grpo-baseline")
    _write_run(b, gspo, config={"trainer": {"batch_size": 4, "grad_accum": 2}})
    return a, b


def _lines(fig) -> dict[str, dict[str, list]]:
    """{subplot title: {legend label: [(x, y), ...]}}"""
    return {ax.get_title(): {line.get_label(): list(zip(*line.get_data())) for line in ax.get_lines()}
            for ax in fig.axes if ax.get_visible()}


def test_default_metrics_one_subplot_each_by_step(two_runs):
    drawn = _lines(plot_runs(two_runs))
    # in DEFAULT_METRICS order; actor/lr is not among them, and `loss` (only NaN) gets no subplot
    assert list(drawn) == ["reward/mean", "eval/reward", "eval/pass@4", "actor/approx_kl", "actor/loss",
                           "time/generate", "time/update"]
    assert drawn["reward/mean"] == {"grpo-baseline": [(1, 0.1), (2, 0.2), (3, 0.1 * 3)],
                                    "gspo": [(1, 0.2), (2, 0.4)]}
    assert drawn["eval/reward"]["grpo-baseline"] == [(0, 0.1), (3, 0.4)]
    assert list(drawn["time/update"]) == ["grpo-baseline"]


def test_samples_axis_sums_logged_samples_or_uses_the_batch_from_config(two_runs):
    drawn = _lines(plot_runs(two_runs, x="samples", metrics=["reward/*", "eval/reward"]))
    assert list(drawn) == ["reward/mean", "eval/reward"]
    assert [x for x, _ in drawn["reward/mean"]["grpo-baseline"]] == [8, 16, 24]  # running sum of `samples`
    assert [x for x, _ in drawn["reward/mean"]["gspo"]] == [8, 16]  # step x 4 x 2
    assert drawn["eval/reward"]["grpo-baseline"] == [(0, 0.1), (24, 0.4)]


def test_cli_writes_the_png_and_names_bad_input(two_runs, tmp_path, capsys):
    out = main([*map(str, two_runs), "--x", "samples", "-o", str(tmp_path / "plots" / "cmp.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(out) in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no logged metric matches \['nope'\]"):
        plot_runs(two_runs, metrics=["nope"])
    with pytest.raises(FileNotFoundError, match="empty: no metrics.jsonl"):
        plot_runs([tmp_path / "empty"])
    bare = tmp_path / "bare"
    _write_run(bare, [{"step": 1, "loss": 1.0}])
    with pytest.raises(ValueError, match="bare: no `samples` metric and no config.json"):
        plot_runs([bare], x="samples")
    # two runs with the same name are told apart by their paths
    twin = tmp_path / "other" / "gspo"
    _write_run(twin, [{"step": 1, "reward/mean": 1.0}])
    assert set(_lines(plot_runs([two_runs[1], twin]))["reward/mean"]) == {str(two_runs[1]), str(twin)}
