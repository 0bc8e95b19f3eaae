"""`python -m align [group=option ...] [key=value ...]`: one Hydra entry point for every stage.

    python -m align                                   # SFT of the shipped stories260K
    python -m align algo=sft model=stories260k_lora trainer.max_steps=300
    python -m align --help                            # the groups and their options
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
    # SIGTERM or Ctrl-C: finish the step, checkpoint, exit 128 + the signal (align/lifecycle.py)
    try:
        with stop_on_signals():
            run(run_cfg, cfg)
    except RunStopped as stop:
        print(f"align: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)


def main() -> None:
    import hydra

    register_resolvers()
    register_schemas()
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(_task)()


if __name__ == "__main__":
    main()
