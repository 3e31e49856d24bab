"""The placement tuner: every policy on a model's factors, and the one to use
(kfac_dist/jobs/tuner.py).

    python scripts/tune_placement.py convnet --replicas 4
    python scripts/tune_placement.py ResNet50 --replicas 8 --measure
    python scripts/tune_placement.py ResNet50 --input-shape 160,160,3 --replicas 64 --json
    python scripts/tune_placement.py path/to/model.keras --replicas 2

Same as `kfac-tune-placement`.
"""

import sys

from kfac_dist.jobs.tuner import main

if __name__ == "__main__":
    sys.exit(main())
