"""The training command: an example model with K-FAC or Adam under any tf.distribute strategy.

    python -m kfac_dist.jobs.train --example autoencoder --optimizer kfac --steps 200
    python scripts/launch_local.py --num-workers 2 -- \\
        python -m kfac_dist.jobs.train --strategy multiworker --steps 200
    srun python -m kfac_dist.jobs.train --strategy multiworker --cluster slurm --steps 200
    python -m kfac_dist.jobs.train --strategy tpu --tpu local --steps 200

Flags first, TensorFlow after: `main` parses and checks the flags
(kfac_dist/jobs/train_flags.py) before TensorFlow loads, so that `--help` and
a bad flag answer at once; only then does it import the run
(kfac_dist/jobs/train_run.py: the strategy, the data, the model, `fit`).
The run's names (`make_strategy`, `SetupError`, `TrainResult`, ...) are this
module's too, loaded on first use. `scripts/train.py` and the console script
`kfac-train` call `main`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kfac_dist.jobs.train_flags import (  # noqa: F401  (the command's names, for its users)
    CHECKPOINT_NAME,
    CROSS_DEVICE_OPS_NAMES,
    EXAMPLE_NAMES,
    EXIT_FAILURE,
    KFAC_DEFAULTS,
    KFAC_FLAGS,
    SLURM_PORT_BASE,
    STEP_CHECKPOINTS,
    STRATEGIES,
    TPU_LOCAL,
    TPU_STEPS_PER_EXECUTION,
    TPU_TIMEOUT_S,
    build_parser,
    parse_args,
)

if TYPE_CHECKING:
    import keras

RUN_MODULE = "kfac_dist.jobs.train_run"
# TensorFlow's INFO lines bury the run's own; a value already set is kept.
TF_LOG_LEVEL = "1"


def main(
    argv: Sequence[str] | None = None,
    parser: argparse.ArgumentParser | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> int:
    """Runs the command (with `callbacks` added to `fit`'s); a setup problem (no TPU,
    bad cluster, too little data) is one line on stderr and exit status 1.

    A multi-worker run that succeeded ends its process here, once every worker
    is done, so that none logs errors about its peers' exit (kfac_dist.jobs.shutdown).
    """
    parser = parser or build_parser()
    args = parse_args(argv, parser)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", TF_LOG_LEVEL)
    # Deferred on purpose: the flags are checked before TensorFlow takes seconds to load.
    from kfac_dist.jobs import train_run

    return train_run.run(args, parser, callbacks)


def __getattr__(name: str) -> Any:
    """The run's names (kfac_dist/jobs/train_run.py), imported on first use."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    run = importlib.import_module(RUN_MODULE)
    try:
        return getattr(run, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    sys.exit(main())
