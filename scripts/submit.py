"""Submit a Hydra run to a Ray cluster as a Ray job: a thin wrapper of `python -m align.launch`.

    python scripts/submit.py --address http://127.0.0.1:8265 -- algo=sft output_dir=/shared/runs/a
    python scripts/submit.py --help

See align/launch.py for the runtime env, what the cluster must provide and the exit codes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without `pip install -e .`

from align.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
