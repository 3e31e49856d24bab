"""Times one large Kronecker pair kept whole against its diagonal blocks (`max_factor_dim`)
(kfac_dist/jobs/factor_split_benchmark.py).

    python scripts/benchmark_factor_split.py
    python scripts/benchmark_factor_split.py --dim 4608 --output-dim 512 --bounds none,2048,1024,512
"""

import sys

from kfac_dist.jobs.factor_split_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
