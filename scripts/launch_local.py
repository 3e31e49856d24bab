"""Command-line entry point of the multi-worker launcher (see kfac_dist/launch.py).

    python scripts/launch_local.py --num-workers 2 -- python train.py --flag

It runs kfac_dist/launch.py as a file, not through the package, whose import
loads TensorFlow: the launcher then starts at once, also on a host without
TensorFlow (the one that starts workers over ssh).
"""

import runpy
from pathlib import Path

if __name__ == "__main__":
    launcher = Path(__file__).resolve().parents[1] / "kfac_dist" / "launch.py"
    runpy.run_path(str(launcher), run_name="__main__")
