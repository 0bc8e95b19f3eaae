#!/usr/bin/env bash
# The GPU check of the vLLM rollout backend: one prepared script for a machine with an NVIDIA GPU.
#
# 1. Finds a Python with CUDA vLLM: $PYTHON if set, else python3 when it already has vllm and
#    sees a GPU, else the virtual environment $GPU_VENV (default .venv-gpu), created here with
#    the official `vllm` wheel (it brings its own CUDA torch), peft, and this package (no deps).
# 2. Runs scripts/gpu_check.py: generation, log-prob agreement with the trainer and the HF
#    backend on the same weights (mean absolute difference), LoRA sync changes the outputs (and
#    matches transformers+peft), full in-place sync and restore, sleep mode, throughput, an
#    RL worker with rollout.backend=vllm whose sync keeps vLLM on the trained actor, GRPO through
#    `python -m align` (the driver and Ray workers asking for the GPU, vLLM rollouts, bf16-mixed),
#    and SFT full fine-tuning under trainer.strategy=fsdp2 (FSDP2 over a one-GPU group, bf16
#    policy) against the unsharded engine.
# 3. The last line of stdout is the JSON summary; exit 0 when every check passed.
# 4. Before that, scripts/bench_async.py on the GPU (sync against async GRPO, one GPU shared by
#    the trainer and the rollout worker; HF rollouts, since vLLM's attention backends may refuse
#    stories260K's head_dim 8): its JSON goes to $BENCH_ASYNC_OUT (default bench_async_gpu.json);
#    a failure is reported on stderr and does not stop the check.
#    SKIP_BENCH_ASYNC=1 skips it.
#
# The installation needs PyPI. Offline, pre-build the environment (or set PYTHON) and rerun.
# Usage: bash scripts/gpu_check.sh [gpu_check.py options: --model PATH --dtype float32 ...]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${GPU_VENV:-$ROOT/.venv-gpu}"

has_vllm_gpu() {
    "$1" -c "import torch, vllm; assert torch.cuda.is_available()" >/dev/null 2>&1
}

if [[ -n "${PYTHON:-}" ]]; then
    PY="$PYTHON"
elif has_vllm_gpu python3; then
    PY=python3
else
    PY="$VENV/bin/python"
    if ! has_vllm_gpu "$PY"; then
        echo "gpu_check: installing vllm into $VENV (a few minutes)" >&2
        python3 -m venv "$VENV"
        # vllm pins its own torch; install it first so nothing else picks a torch for it.
        "$PY" -m pip install --quiet --upgrade pip >&2
        "$PY" -m pip install --quiet "vllm>=0.31" >&2
        "$PY" -m pip install --quiet "peft>=0.21" "safetensors>=0.4" >&2
        "$PY" -m pip install --quiet --no-deps -e "$ROOT" >&2
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || echo "gpu_check: no nvidia-smi" >&2
"$PY" -c "import torch, vllm; print(f'gpu_check: vllm {vllm.__version__}, torch {torch.__version__}, cuda {torch.cuda.is_available()}')" >&2
if [[ "${SKIP_BENCH_ASYNC:-0}" != "1" ]]; then
    "$PY" scripts/bench_async.py --device cuda --gpus-per-worker 0.5 --max-new-tokens 256 \
        > "${BENCH_ASYNC_OUT:-bench_async_gpu.json}" || echo "gpu_check: bench_async.py failed (exit $?)" >&2
fi
exec "$PY" scripts/gpu_check.py "$@"
