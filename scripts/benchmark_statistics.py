"""The statistics benchmark: conv A from patches against shifted views, diagonal-only steps
(kfac_dist/jobs/statistics_benchmark.py).

    python scripts/benchmark_statistics.py

Same as `kfac-benchmark-statistics`; see BENCHMARKS.md for results.
"""

import sys

from kfac_dist.jobs.statistics_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
