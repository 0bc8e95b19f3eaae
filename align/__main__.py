"""`python -m align [group=option ...] [key=value ...]`: one Hydra entry point for every stage.

    python -m align                                   # SFT of the shipped stories260K
    python -m align algo=sft model=stories260k_lora trainer.max_steps=300
    python -m align --help                            # the groups and their options
    python -m align plan algo=grpo model=hf model.name_or_path=Qwen/Qwen2.5-7B   # will it fit? (align/plan.py)
"""

from __future__ import annotations

import sys

from align.config import CONFIG_DIR, ConfigError, register_resolvers, register_schemas


def _task(cfg) -> None:
    from align.config import to_config
    from align.lifecycle import RunStopped, stop_on_signals
    from align.trainers import run

    try:
        run_cfg = to_config(cfg)
    except ConfigError as exc:
        print(f"align: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    from align.plan import check_memory

    try:  # trainer.check_memory: warn (default) or refuse (strict) when the plan does not fit
        check_memory(run_cfg)
    except ConfigError as exc:
        print(f"align: {exc}", file=sys.stderr)
        sys.exit(2)
    # SIGTERM or Ctrl-C: finish the step, checkpoint, exit 128 + the signal (align/lifecycle.py)
    try:
        with stop_on_signals():
            run(run_cfg, cfg)
    except RunStopped as stop:
        print(f"align: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)


def pin_malloc_threshold(threshold: int = 1 << 20) -> None:
    """Make freed tensors go back to the OS on CPU (Linux glibc), so a run's peak memory is what its
    tensors need and what `python -m align plan` predicts.

    glibc serves large allocations with mmap and returns them on free, but raises that threshold
    (up to 32 MiB) each time such a block is freed; then a step's activations come from the heap,
    which keeps them after they are freed. Measured on a 25M-parameter Llama: a two-step LoRA SFT
    run peaked at 1.89 GiB resident with the dynamic threshold, 1.17 GiB with it fixed at 1 MiB
    (scripts/bench_plan.py, sft_lora). This fixes the threshold for this process (mallopt M_MMAP_THRESHOLD)
    and, through MALLOC_MMAP_THRESHOLD_, for the Ray workers it starts. A MALLOC_MMAP_THRESHOLD_
    already set by the user is left alone."""
    import ctypes
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD = -3 (malloc.h)
    except (OSError, AttributeError):  # not glibc (musl): nothing to pin
        pass


def main() -> None:
    from align.lifecycle import quiet_arrow_jemalloc

    pin_malloc_threshold()
    quiet_arrow_jemalloc()
    if sys.argv[1:2] == ["plan"]:  # before Hydra: the planner composes the same overrides itself
        from align.plan import main as plan_main

        sys.exit(plan_main(sys.argv[2:]))
    import hydra

    register_resolvers()
    register_schemas()
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(_task)()


if __name__ == "__main__":
    main()
