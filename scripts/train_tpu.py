"""Command-line entry point of training on a TPU (the logic is in kfac_dist/tpu.py).

    python scripts/train_tpu.py --tpu local --example autoencoder --steps 500   # on a TPU VM

Same as `python -m kfac_dist.tpu`; needs kfac_dist installed (pip install -e .).
"""

import sys

from kfac_dist.tpu import main

if __name__ == "__main__":
    sys.exit(main())
