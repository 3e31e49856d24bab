"""The ResNet-50 benchmark: K-FAC's step cost and peak memory against Adam's, in one run
(kfac_dist/jobs/resnet_benchmark.py).

    python scripts/benchmark_resnet.py                          # one device, ResNet-50, batch 32
    python scripts/benchmark_resnet.py --replicas 2             # Mirrored over 2 logical CPUs
    python scripts/benchmark_resnet.py --kfac-arg max_factor_dim=1024 --json out.json
    python scripts/benchmark_resnet.py --replicas 1 2 --write   # also update BENCHMARKS.md

Same as `kfac-benchmark-resnet`; see BENCHMARKS.md for results.
"""

import sys

from kfac_dist.jobs.resnet_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
