"""The README's main command, `python -m align algo=pipeline`, on a cut-down schedule: every
stage runs, hands its model to the next, and the summary table and curves are written."""

import json

import pytest

from align.config import compose
from align.trainers import run
from align.trainers.metrics import read_metrics

SMALL = "'data.limit=96','data.val_size=16','data.max_length=96','data.max_prompt_length=64'," \
        "'data.max_response_length=24','trainer.progress=false','trainer.num_threads=1'"


def test_pipeline_runs_every_stage_and_reports(tmp_path, capsys):
    overrides = [
        "algo=pipeline", f"output_dir={tmp_path}", "trainer.progress=false",
        f"algo.overrides.sft=[{SMALL},'trainer.max_steps=6','trainer.eval_every=6','trainer.save_every=6']",
        f"algo.overrides.rm=[{SMALL},'trainer.max_steps=4','trainer.eval_every=4','trainer.save_every=4','trainer.eval_batches=2']",
        f"algo.overrides.dpo=[{SMALL},'trainer.max_steps=4','trainer.eval_every=4','trainer.save_every=4','trainer.eval_batches=2']",
        "algo.overrides.grpo=['trainer.max_steps=2','trainer.eval_every=2','trainer.save_every=2',"
        "'algo.rollout_batch_size=2','algo.num_generations=4','algo.eval_prompts=4','algo.eval_samples=1',"
        "'rollout.max_new_tokens=16','cluster.num_cpus=2','algo.eval_k=[1]','algo.eval_threshold=0.3']",
        "algo.eval_overrides=['algo.n=2','algo.k=[1,2]','algo.threshold=0.3','data.val_size=4','trainer.progress=false']",
        "algo.overrides.quantize=['algo.eval_samples=8','algo.speed_prompts=1','algo.max_new_tokens=8']",
    ]
    cfg, raw = compose(overrides)
    summary = run(cfg, raw)

    assert [r["stage"] for r in summary["stages"]] == ["sft", "rm", "dpo", "grpo", "eval", "quantize", "serve"]
    # GRPO's policy evaluated before (the base it starts from) and after (its final/) on the same prompts,
    # sampling with GRPO's settings; GRPO's own held-out evaluation logs pass@1 beside the mean reward
    evals = {when: json.loads((tmp_path / f"grpo_eval_{when}" / "summary.json").read_text())
             for when in ("before", "after")}
    assert evals["before"]["model"].endswith("stories260K") and evals["after"]["model"] == str(tmp_path / "grpo" / "final")
    for e in evals.values():
        assert e["prompts"] == 4 and e["n"] == 2 and e["response_length"]["max"] <= 16
        assert 0 <= e["pass@1"] <= e["pass@2"] <= 1
    row = summary["stages"][4]
    assert row["before"] == evals["before"]["mean@2"] and row["after"] == evals["after"]["mean@2"]
    grpo_rows = read_metrics(tmp_path / "grpo")
    for r in (grpo_rows[0], grpo_rows[-1]):
        assert r["eval/mean@1"] == pytest.approx(r["eval/reward"], abs=1e-6) and 0 <= r["eval/pass@1"] <= 1
    # hand-over: rm and dpo started from the SFT model, quantize from the GRPO actor
    sft_final = str(tmp_path / "sft" / "final")
    for stage in ("rm", "dpo"):
        resolved = json.loads((tmp_path / stage / "config.json").read_text())
        assert resolved["model"]["name_or_path"] == sft_final
    assert summary["products"]["grpo"] == str(tmp_path / "grpo" / "final")
    report = json.loads((tmp_path / "quantize" / "report.json").read_text())
    assert report["compression_ratio"] > 2
    # the served query came back over HTTP from the quantized model
    served = summary["results"]["serve"]
    assert served["url"].startswith("http://127.0.0.1:") and served["finish_reason"] in ("stop", "length")
    # headline figures are numbers, the table is printed, the plot is a PNG
    for row in summary["stages"][:5]:
        assert isinstance(row["before"], float) and isinstance(row["after"], float), row
    out = capsys.readouterr().out
    assert "headline metric" in out and "held-out story reward" in out and "eval before -> after grpo: mean@2" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
