"""The training command's flags: parsed and checked without TensorFlow, so that `--help`
and a bad flag answer at once (the run itself is kfac_dist/jobs/train_run.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from kfac_dist.jobs import benchmarks
from kfac_dist.jobs.examples import data as data_lib
from kfac_dist.options import ESTIMATION_MODES, INVERSE_METHODS, PLACEMENT_POLICIES

STRATEGIES = ("default", "mirrored", "multiworker", "tpu")
OPTIMIZERS = ("kfac", "adam")
CLUSTERS = ("tf_config", "slurm")
CHECKPOINT_NAME = "model.keras"
STEP_CHECKPOINTS = "steps"  # --checkpoint-every's saves, inside --checkpoint-dir
SLURM_PORT_BASE = 8888
EXIT_FAILURE = 1
EXAMPLE_NAMES = ("autoencoder", "convnet")  # kfac_dist/jobs/train_run.py's EXAMPLES
CROSS_DEVICE_OPS_NAMES = ("reduce_to_one", "nccl", "hierarchical_copy")
# The TPU: a TPU VM's own, how long to look for it, and steps per execution there.
TPU_LOCAL = "local"
TPU_TIMEOUT_S = 60.0
TPU_STEPS_PER_EXECUTION = 32

# K-FAC's defaults: the autoencoder benchmark's default point (kfac_dist/jobs/benchmarks.py).
KFAC_DEFAULTS = {**benchmarks.KFAC_FIXED, **benchmarks.KFAC_DEFAULT}
KFAC_FLAGS = (
    "damping",
    "momentum",
    "norm_constraint",
    "invert_every",
    "cov_update_every",
    "inverse_method",
    "estimation_mode",
    "placement",
)
# Flags that only one strategy reads; given with another, they are an error.
STRATEGY_FLAGS = {
    "mirrored": ("devices", "cross_device_ops"),
    "multiworker": ("cluster", "slurm_port_base", "slurm_gpus_per_task"),
    "tpu": ("tpu", "zone", "project", "tpu_timeout"),
}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser(
    prog: str = "python -m kfac_dist.jobs.train", strategies: Sequence[str] = STRATEGIES
) -> argparse.ArgumentParser:
    """The command line; the TPU command reuses it with `strategies=("tpu",)`."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train an MNIST example with K-FAC or Adam under a tf.distribute strategy.",
    )
    run = parser.add_argument_group("what to train")
    run.add_argument("--strategy", choices=strategies, default=strategies[0])
    run.add_argument("--example", choices=EXAMPLE_NAMES, default="autoencoder")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="kfac")
    run.add_argument(
        "--batch-size",
        type=_positive_int,
        default=benchmarks.BATCH_SIZE,
        help="global batch size, all replicas together (default: %(default)s)",
    )
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, help="train this many steps (one epoch)")
    length.add_argument(
        "--epochs", type=_positive_int, help="passes over the data (default: 1 if no --steps)"
    )
    run.add_argument(
        "--steps-per-execution",
        type=_positive_int,
        help=f"train steps per call of the compiled function "
        f"(default: {TPU_STEPS_PER_EXECUTION} on TPU, else 1)",
    )
    run.add_argument("--seed", type=int, default=0, help="initial weights, shuffling, sampling")
    run.add_argument(
        "--verbose", type=int, choices=(0, 1, 2), default=2, help="Keras fit verbosity (chief)"
    )

    data = parser.add_argument_group("data")
    data.add_argument("--data-source", choices=data_lib.SOURCES, default="auto")
    data.add_argument("--data-dir", help="a tensorflow-datasets data directory")
    data.add_argument("--limit", type=_positive_int, help="keep the first N examples")

    opt = parser.add_argument_group("optimizer (all but --learning-rate need --optimizer kfac)")
    opt.add_argument(
        "--learning-rate",
        type=_positive_float,
        help=f"default: {KFAC_DEFAULTS['learning_rate']} (kfac), "
        f"{benchmarks.ADAM_LEARNING_RATE} (adam)",
    )
    opt.add_argument("--damping", type=_positive_float, help=f"default: {KFAC_DEFAULTS['damping']}")
    opt.add_argument("--momentum", type=float, help=f"default: {KFAC_DEFAULTS['momentum']}")
    opt.add_argument(
        "--norm-constraint",
        type=float,
        help=f"KL clipping bound C; 0 turns it off (default: {KFAC_DEFAULTS['norm_constraint']})",
    )
    opt.add_argument(
        "--invert-every", type=_positive_int, help=f"default: {KFAC_DEFAULTS['invert_every']}"
    )
    opt.add_argument(
        "--cov-update-every",
        type=_positive_int,
        help=f"default: {KFAC_DEFAULTS['cov_update_every']}",
    )
    opt.add_argument(
        "--inverse-method",
        choices=INVERSE_METHODS,
        help=f"default: {KFAC_DEFAULTS['inverse_method']}",
    )
    opt.add_argument(
        "--estimation-mode",
        choices=ESTIMATION_MODES,
        help=f"default: {KFAC_DEFAULTS['estimation_mode']}",
    )
    opt.add_argument("--placement", choices=PLACEMENT_POLICIES, help="default: round_robin")

    dist = parser.add_argument_group("distribution")
    dist.add_argument(
        "--devices",
        help="mirrored: comma-separated devices (default: every GPU, else every logical CPU)",
    )
    dist.add_argument(
        "--cross-device-ops",
        choices=("auto", *CROSS_DEVICE_OPS_NAMES),
        help="mirrored: how replicas all-reduce (default: auto, i.e. reduce_to_one on CPUs, "
        "TensorFlow's choice on GPUs)",
    )
    dist.add_argument(
        "--cluster",
        choices=CLUSTERS,
        help="multiworker: where the peers come from (default: tf_config, the TF_CONFIG "
        "variable; slurm: the srun step)",
    )
    dist.add_argument(
        "--slurm-port-base",
        type=_positive_int,
        help=f"multiworker --cluster slurm: first port of each node (default: {SLURM_PORT_BASE})",
    )
    dist.add_argument(
        "--slurm-gpus-per-task",
        type=int,
        help="multiworker --cluster slurm: GPUs each task uses (default: the GPUs it sees)",
    )
    dist.add_argument(
        "--tpu",
        help=f"tpu: 'local' on a TPU VM, a TPU node's name, or grpc://host:port "
        f"(default: {TPU_LOCAL})",
    )
    dist.add_argument("--zone", help="tpu: the TPU node's zone (default: this VM's)")
    dist.add_argument("--project", help="tpu: the TPU node's project (default: this VM's)")
    dist.add_argument(
        "--tpu-timeout",
        type=_positive_float,
        help=f"tpu: seconds to find and reach the TPU (default: {TPU_TIMEOUT_S:g})",
    )

    out = parser.add_argument_group("outputs")
    out.add_argument("--checkpoint-dir", type=Path, help=f"save {CHECKPOINT_NAME} there at the end")
    out.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="K",
        help=f"also save the whole training state every K steps into "
        f"<checkpoint-dir>/{STEP_CHECKPOINTS}; the same command, run again, resumes from the "
        "latest save (needs --checkpoint-dir and --steps)",
    )
    out.add_argument("--tensorboard-dir", type=Path, help="TensorBoard logs")
    out.add_argument(
        "--json-out",
        type=Path,
        help="write the history there (the chief; every other task writes "
        "<name>.<task type>-<index>.json beside it)",
    )
    return parser


def parse_args(
    argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
    """Parses and checks that every flag given is read by the chosen optimizer and strategy."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.optimizer != "kfac":
        given = [flag for flag in KFAC_FLAGS if getattr(args, flag) is not None]
        if given:
            parser.error(f"{_flags(given)} need --optimizer kfac")
    for strategy, flags in STRATEGY_FLAGS.items():
        given = [flag for flag in flags if getattr(args, flag) is not None]
        if given and args.strategy != strategy:
            parser.error(f"{_flags(given)} need --strategy {strategy}")
    if args.slurm_port_base is not None or args.slurm_gpus_per_task is not None:
        if args.cluster != "slurm":
            parser.error("--slurm-port-base and --slurm-gpus-per-task need --cluster slurm")
    if args.slurm_gpus_per_task is not None and args.slurm_gpus_per_task < 0:
        parser.error("--slurm-gpus-per-task must be >= 0")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        parser.error("--momentum must be in [0, 1)")
    if args.norm_constraint is not None and args.norm_constraint < 0:
        parser.error("--norm-constraint must be >= 0 (0 turns KL clipping off)")
    if args.checkpoint_every is not None and (args.checkpoint_dir is None or args.steps is None):
        parser.error("--checkpoint-every needs --checkpoint-dir and --steps")
    if args.strategy == "multiworker" and (args.steps_per_execution or 1) > 1:
        parser.error(
            "--steps-per-execution > 1 does not work with --strategy multiworker: Keras "
            "3.15 fails inside its multi-step loop under MultiWorkerMirroredStrategy, "
            "even with Adam (see kfac_dist.multi_worker); leave it at 1"
        )
    return args


def _flags(names: Sequence[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)
