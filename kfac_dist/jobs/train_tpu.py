"""`python -m kfac_dist.jobs.train_tpu`: the training command with `--strategy tpu`
(kfac_dist/jobs/commands.py; kfac_dist/jobs/tpu.py finds and connects the TPU)."""

import sys

from kfac_dist.jobs.commands import train_tpu as main

if __name__ == "__main__":
    sys.exit(main())
