"""Command-line entry point of training (the logic is in kfac_dist/train.py).

    python scripts/train.py --strategy mirrored --example convnet --optimizer kfac --steps 100

Same as `python -m kfac_dist.train`; needs kfac_dist installed (pip install -e .).
"""

import sys

from kfac_dist.train import main

if __name__ == "__main__":
    sys.exit(main())
