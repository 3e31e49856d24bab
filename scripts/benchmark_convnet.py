"""The convnet benchmark: steps and seconds to a validation accuracy on MNIST-5k for
K-FAC, Adam, SGD with momentum and Keras' Muon on a small ResNet-style network
(kfac_dist/jobs/convnet_benchmark.py).

    python scripts/benchmark_convnet.py                  # every grid point
    python scripts/benchmark_convnet.py --json out.json
    python scripts/benchmark_convnet.py --write          # also update BENCHMARKS.md

Same as `kfac-benchmark-convnet`; see BENCHMARKS.md for results.
"""

import sys

from kfac_dist.jobs.convnet_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
