"""First-fit trace time of K-FAC against Adam (kfac_dist/jobs/trace_benchmark.py).

    python scripts/benchmark_trace.py --layers 10 40 80 [--write]

Same as `kfac-benchmark-trace`.
"""

import sys

from kfac_dist.jobs.trace_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
