"""The multi-worker launcher (kfac_dist/jobs/launch.py).

    python scripts/launch_local.py --num-workers 2 -- python train.py --flag

Same as `kfac-launch`. Importing the launcher loads neither TensorFlow nor
Keras (the package's names load on first use): it starts at once, also on a
host without TensorFlow (the one that starts workers over ssh).
"""

import sys

from kfac_dist.jobs.launch import main

if __name__ == "__main__":
    sys.exit(main())
