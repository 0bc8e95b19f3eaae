"""The README's main command, `python -m align algo=pipeline`, on a cut-down schedule: every
stage runs, hands its model to the next, and the summary table and curves are written."""

import json

from align.config import compose
from align.trainers import run

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
        "'rollout.max_new_tokens=16','cluster.num_cpus=2']",
        "algo.overrides.quantize=['algo.eval_samples=8','algo.speed_prompts=1','algo.max_new_tokens=8']",
    ]
    cfg, raw = compose(overrides)
    summary = run(cfg, raw)

    assert [r["stage"] for r in summary["stages"]] == ["sft", "rm", "dpo", "grpo", "quantize", "serve"]
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
    for row in summary["stages"][:4]:
        assert isinstance(row["before"], float) and isinstance(row["after"], float), row
    out = capsys.readouterr().out
    assert "headline metric" in out and "held-out story reward" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
