"""The training command on a TPU (kfac_dist/jobs/train_tpu.py).

    python scripts/train_tpu.py --tpu local --example autoencoder --steps 500   # on a TPU VM

Same as `python -m kfac_dist.jobs.train_tpu` and `kfac-train-tpu`; needs
kfac_dist installed (pip install -e .).
"""

import sys

from kfac_dist.jobs.train_tpu import main

if __name__ == "__main__":
    sys.exit(main())
