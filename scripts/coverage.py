"""The coverage report: how much of each keras.applications model K-FAC's blocks cover,
and whether a few steps of fit lower the loss (kfac_dist/jobs/coverage.py).

    python scripts/coverage.py --models MobileNetV2 ResNet50    # print only
    python scripts/coverage.py --models MobileNet --write       # also update BENCHMARKS.md
    python scripts/coverage.py --coverage-only --output coverage.json

Same as `kfac-coverage`, but `--write` updates the BENCHMARKS.md of the
checkout that holds this script.
"""

import sys

from kfac_dist.jobs.coverage import main

if __name__ == "__main__":
    sys.exit(main(script=__file__))
