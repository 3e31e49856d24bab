"""The TPU command: the training command with `--strategy tpu` (kfac_dist/jobs/tpu.py
finds and connects the TPU).

    python -m kfac_dist.jobs.train_tpu --tpu local --example autoencoder --steps 500  # TPU VM

Its flags are parsed before TensorFlow loads, as the training command's are.
`scripts/train_tpu.py` and the console script `kfac-train-tpu` call `main`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kfac_dist.jobs import train, train_flags

PROG = "python -m kfac_dist.jobs.train_tpu"


def main(argv: Sequence[str] | None = None) -> int:
    """The training command with `--strategy tpu`, its only strategy."""
    return train.main(argv, train_flags.build_parser(prog=PROG, strategies=("tpu",)))


if __name__ == "__main__":
    sys.exit(main())
