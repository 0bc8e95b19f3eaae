"""Importing align.core must stay cheap: torch, and nothing heavier."""

import subprocess
import sys

HEAVY = ("transformers", "ray", "vllm", "peft", "datasets", "accelerate", "deepspeed", "hydra")


def test_import_align_core_pulls_in_no_heavy_dependency():
    code = (
        "import sys, align.core\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(heavy))\n"
        "assert 'torch' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"align.core imported: {done.stdout.strip()}"
