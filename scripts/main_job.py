"""Command line of the main job (the logic is in kfac_dist/jobs/main_job.py).

    python scripts/main_job.py                # K-FAC, then Adam, on 2 local workers
    python scripts/main_job.py --help

Trains the MNIST autoencoder with each optimizer under MultiWorkerMirroredStrategy,
prints a table and writes out/main_job/loss.png; needs `pip install -e ".[examples]"`.
"""

import os
import sys

# Before TensorFlow is imported: this process' own informational logs, and the workers'.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kfac_dist.jobs.main_job import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
