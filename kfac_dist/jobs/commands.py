"""The training commands as users start them: flags first, TensorFlow after.

The flags are parsed and checked before TensorFlow loads (kfac_dist/jobs/
train_flags.py), so `--help` and a bad flag answer at once; only then does
the run import kfac_dist/jobs/train.py. `scripts/train.py`,
`scripts/train_tpu.py` and the console scripts `kfac-train` and
`kfac-train-tpu` call these.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from kfac_dist.jobs import train_flags


def train(argv: Sequence[str] | None = None) -> int:
    """The training command, on every strategy."""
    return _run(train_flags.build_parser(), argv)


def train_tpu(argv: Sequence[str] | None = None) -> int:
    """The training command with `--strategy tpu`."""
    parser = train_flags.build_parser(
        prog="python -m kfac_dist.jobs.train_tpu", strategies=("tpu",)
    )
    return _run(parser, argv)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    args = train_flags.parse_args(argv, parser)
    # Deferred on purpose: the flags are checked before TensorFlow takes seconds to load.
    from kfac_dist.jobs import train as training_run

    return training_run.run(args, parser)
