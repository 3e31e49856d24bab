"""Command line of the placement benchmark: each policy's max share on ResNet-50 shapes.

    python scripts/benchmark_placement.py              # print only: the tree stays clean
    python scripts/benchmark_placement.py --write      # print, and update BENCHMARKS.md
    python scripts/benchmark_placement.py --replicas 2 16 128

Exits with 1 if "balanced" is not within 5% of the lower bound at every
replica count. The logic lives in `kfac_dist.jobs.tuner`.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BENCHMARKS_FILE = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "BENCHMARKS.md")
)
TOLERANCE = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    from kfac_dist.jobs.tuner import BENCHMARK_REPLICAS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=list(BENCHMARK_REPLICAS))
    parser.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also put the section into --output (a tracked file: left alone unless asked)",
    )
    parser.add_argument(
        "--output", default=BENCHMARKS_FILE, help="markdown file --write updates (%(default)s)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from kfac_dist.jobs import tuner

    args = parse_args(argv)
    model = tuner.load_model("ResNet50")
    benchmark = tuner.benchmark_placement(
        tuner.model_units(model),
        model_name="`keras.applications.ResNet50(weights=None)`",
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
