"""The MNIST autoencoder benchmark's command: K-FAC against Adam in one run.

    python scripts/benchmark_autoencoder.py                    # K-FAC at the default point
    python scripts/benchmark_autoencoder.py --grid             # K-FAC at every grid point
    python scripts/benchmark_autoencoder.py --adaptive         # adaptive K-FAC
    python scripts/benchmark_autoencoder.py --steps 300 --json results.json

The runs and their report are kfac_dist/jobs/benchmarks.py; BENCHMARKS.md
holds the results. The flags are parsed before TensorFlow loads (`--help`
answers at once). `scripts/benchmark_autoencoder.py` and the console script
`kfac-benchmark-autoencoder` call `main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from kfac_dist.jobs import benchmarks

DESCRIPTION = "Command line of the MNIST autoencoder benchmark: K-FAC against Adam in one run."


def build_parser() -> argparse.ArgumentParser:
    """The command line (prog: the name it was started by)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--steps", type=int, help="steps for both optimizers")
    parser.add_argument("--kfac-steps", type=int, default=600)
    parser.add_argument(
        "--adam-steps",
        type=int,
        default=2500,
        help="Adam's step cap (a threshold not reached by then is reported as such)",
    )
    parser.add_argument(
        "--grid",
        action="store_true",
        help="run K-FAC at each point of kfac_dist.jobs.benchmarks.KFAC_GRID "
        "(learning_rate × damping × norm_constraint) and compare the best with Adam",
    )
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--damping", type=float)
    parser.add_argument("--norm-constraint", type=float)
    parser.add_argument("--no-adam", action="store_true", help="K-FAC runs only")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="run adaptive K-FAC (kfac_dist.jobs.benchmarks.KFAC_ADAPTIVE: Levenberg-Marquardt "
        "damping, quadratic-model momentum) instead of the fixed default point",
    )
    parser.add_argument(
        "--interleave-rounds",
        type=int,
        default=6,
        help="after the runs, time Adam and the best K-FAC in this many alternating "
        "blocks of 20 steps (a step-time ratio that holds up under load; 0: skip)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init",
        default="glorot_uniform",
        help="kernel initializer of the autoencoder: glorot_uniform (Keras' default) "
        "or lecun_normal (Haiku's, as in kfac-jax's runs)",
    )
    parser.add_argument("--batch-size", type=int, default=benchmarks.BATCH_SIZE)
    parser.add_argument("--data-dir", help="a tensorflow-datasets data directory")
    parser.add_argument("--json", help="write the results as JSON to this path ('-': stdout)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags; `--steps N` sets both `--kfac-steps` and `--adam-steps`."""
    args = build_parser().parse_args(argv)
    if args.steps is not None:
        args.kfac_steps = args.adam_steps = args.steps
    return args


def kfac_point(args: argparse.Namespace) -> dict[str, Any]:
    """K-FAC's point: the default (or adaptive) preset with the flags given over it."""
    point = dict(benchmarks.KFAC_ADAPTIVE if args.adaptive else benchmarks.KFAC_DEFAULT)
    keys = ("damping",) if args.adaptive else ("learning_rate", "damping", "norm_constraint")
    for key in keys:
        if getattr(args, key) is not None:
            point[key] = getattr(args, key)
    return point


def to_json(result: dict[str, Any]) -> str:
    """`run_benchmark`'s result with every run's per-step record, as `--json` writes it."""
    payload = {k: v for k, v in result.items() if not k.startswith("_")}
    payload["runs"] = [
        {
            **r.summary(),
            "losses": r.losses,
            "step_seconds": r.step_seconds,
            "cpu_seconds": r.cpu_seconds,
        }
        for r in result["_runs"]
    ]
    return json.dumps(payload, indent=1)


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints its report (and writes `--json`); exit status 0."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before run_benchmark loads TensorFlow
    result = benchmarks.run_benchmark(
        kfac_steps=args.kfac_steps,
        adam_steps=args.adam_steps,
        grid=benchmarks.KFAC_GRID if args.grid else None,
        kfac_point=kfac_point(args),
        seed=args.seed,
        batch_size=args.batch_size,
        data_dir=args.data_dir,
        kernel_initializer=args.init,
        run_adam=not args.no_adam,
        interleave_rounds=args.interleave_rounds,
        progress=None if args.quiet else _progress,
    )
    benchmarks.publish(args, benchmarks.report(result), lambda: to_json(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
