"""The placement benchmark's command: each policy's max share on ResNet-50 shapes.

    python scripts/benchmark_placement.py              # print only: the tree stays clean
    python scripts/benchmark_placement.py --write      # print, and update BENCHMARKS.md
    python scripts/benchmark_placement.py --replicas 2 16 128

Exits with 1 if "balanced" is not within 5% of the lower bound at every
replica count. Nothing is trained: the plans and their tables are
kfac_dist/jobs/tuner.py's (Keras loads only to build the model, after the
flags are parsed). `scripts/benchmark_placement.py` and the console script
`kfac-benchmark-placement` call `main`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from kfac_dist.jobs import tuner

DESCRIPTION = (
    "Command line of the placement benchmark: each policy's max share on ResNet-50 shapes."
)
TOLERANCE = 0.05
BENCHMARKS_NAME = "BENCHMARKS.md"
MODEL = "ResNet50"
MODEL_LABEL = "`keras.applications.ResNet50(weights=None)`"


def default_output(script: str | None = None) -> str:
    """BENCHMARKS.md at the top of the checkout: the folder above `script`'s (a file
    in scripts/), or without one the folder above this package."""
    if script is None:
        top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    else:
        top = os.path.join(os.path.dirname(os.path.abspath(script)), "..")
    return os.path.normpath(os.path.join(top, BENCHMARKS_NAME))


def build_parser(output: str) -> argparse.ArgumentParser:
    """The command line; `output` is `--output`'s default."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--replicas", type=int, nargs="+", default=list(tuner.BENCHMARK_REPLICAS))
    parser.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also put the section into --output (a tracked file: left alone unless asked)",
    )
    parser.add_argument(
        "--output", default=output, help="markdown file --write updates (%(default)s)"
    )
    return parser


def main(argv: Sequence[str] | None = None, *, script: str | None = None) -> int:
    """Prints the benchmark's section (and writes it with `--write`); exit status 1 if
    "balanced" is not within TOLERANCE of the bound. `script`: the file in scripts/
    that started it, whose checkout's BENCHMARKS.md `--write` updates by default."""
    args = build_parser(default_output(script)).parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras loads TensorFlow
    model = tuner.load_model(MODEL)
    benchmark = tuner.benchmark_placement(
        tuner.model_units(model),
        model_name=MODEL_LABEL,
        replica_counts=args.replicas,
        inverse_method=args.inverse_method,
    )
    section = tuner.benchmark_markdown(benchmark)
    print(section)
    if args.write:
        tuner.write_markdown_section(args.output, section)
        print(f"written to {os.path.normpath(args.output)}")
    within = benchmark.within("balanced", TOLERANCE)
    print(f"balanced within {TOLERANCE:.0%} of the bound at every N: {'yes' if within else 'NO'}")
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
