"""Command-line entry point of training (the logic is in kfac_dist/jobs/train.py).

    python scripts/train.py --strategy mirrored --example convnet --optimizer kfac --steps 100

Same as `python -m kfac_dist.jobs.train`; needs kfac_dist installed (pip install -e .).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines bury the run's own

from kfac_dist.jobs.commands import train as main

if __name__ == "__main__":
    sys.exit(main())
