"""K-FAC against Adam with 2 replicas (kfac_dist/jobs/replica_benchmark.py).

    python scripts/benchmark_replicas.py [--steps 40] [--json out.json]

Same as `kfac-benchmark-replicas`.
"""

import sys

from kfac_dist.jobs.replica_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
