"""The MNIST autoencoder benchmark: K-FAC against Adam in one run
(kfac_dist/jobs/autoencoder_benchmark.py).

    python scripts/benchmark_autoencoder.py                    # K-FAC at the default point
    python scripts/benchmark_autoencoder.py --grid             # K-FAC at every grid point
    python scripts/benchmark_autoencoder.py --adaptive         # adaptive K-FAC
    python scripts/benchmark_autoencoder.py --steps 300 --json results.json

Same as `kfac-benchmark-autoencoder`; see BENCHMARKS.md for results.
"""

import sys

from kfac_dist.jobs.autoencoder_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
