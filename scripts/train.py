"""The training command (kfac_dist/jobs/train.py).

    python scripts/train.py --strategy mirrored --example convnet --optimizer kfac --steps 100

Same as `python -m kfac_dist.jobs.train` and `kfac-train`; needs kfac_dist
installed (pip install -e .).
"""

import sys

from kfac_dist.jobs.train import main

if __name__ == "__main__":
    sys.exit(main())
