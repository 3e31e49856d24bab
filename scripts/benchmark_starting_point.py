"""The starting-point benchmark: one K-FAC point, untuned, against Adam(1e-3) on an MNIST
MLP, a ResNet-style convnet and the autoencoder: seconds to a target loss
(kfac_dist/jobs/starting_point_benchmark.py).

    python scripts/benchmark_starting_point.py           # every candidate point
    python scripts/benchmark_starting_point.py --write   # also update BENCHMARKS.md

Same as `kfac-benchmark-starting-point`; see BENCHMARKS.md for results.
"""

import sys

from kfac_dist.jobs.starting_point_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
