"""Command-line entry point of training on a TPU (the logic is in kfac_dist/jobs/).

    python scripts/train_tpu.py --tpu local --example autoencoder --steps 500   # on a TPU VM

Same as `python -m kfac_dist.jobs.train_tpu`; needs kfac_dist installed (pip install -e .).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines bury the run's own

from kfac_dist.jobs.commands import train_tpu as main

if __name__ == "__main__":
    sys.exit(main())
