"""The placement benchmark: each policy's max share on ResNet-50 shapes
(kfac_dist/jobs/placement_benchmark.py).

    python scripts/benchmark_placement.py              # print only: the tree stays clean
    python scripts/benchmark_placement.py --write      # print, and update BENCHMARKS.md
    python scripts/benchmark_placement.py --replicas 2 16 128

Same as `kfac-benchmark-placement`, but `--write` updates the BENCHMARKS.md
of the checkout that holds this script. Exits with 1 if "balanced" is not
within 5% of the lower bound at every replica count.
"""

import sys

from kfac_dist.jobs.placement_benchmark import main

if __name__ == "__main__":
    sys.exit(main(script=__file__))
