"""Command-line entry point of the multi-worker launcher (see kfac_dist/launch.py).

python scripts/launch_local.py --num-workers 2 -- python train.py --flag
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kfac_dist.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
