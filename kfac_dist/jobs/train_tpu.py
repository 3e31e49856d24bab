"""The TPU command: kfac_dist/jobs/train.py's command with `--strategy tpu`.

Apart from kfac_dist/jobs/tpu.py (which finds and connects the TPU, and which
the training command uses) so that the two import each other in one
direction only.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from kfac_dist.jobs import train


def main(argv: Sequence[str] | None = None) -> int:
    parser = train.build_parser(prog="python -m kfac_dist.jobs.train_tpu", strategies=("tpu",))
    return train.main(argv, parser)


if __name__ == "__main__":
    sys.exit(main())
