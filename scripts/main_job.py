"""The main job (kfac_dist/jobs/main_job.py).

    python scripts/main_job.py                # K-FAC, then Adam, on 2 local workers
    python scripts/main_job.py --help

Trains the MNIST autoencoder with each optimizer under MultiWorkerMirroredStrategy,
prints a table and writes out/main_job/loss.png; needs `pip install -e ".[examples]"`.
Same as `kfac-main-job`.
"""

import sys

from kfac_dist.jobs.main_job import main

if __name__ == "__main__":
    sys.exit(main())
