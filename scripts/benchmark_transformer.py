"""The transformer benchmark: K-FAC against AdamW and Keras' Muon on a small ViT
(MNIST-5k) and a char-level LM (pydoc_data.topics), in one run
(kfac_dist/jobs/transformer_benchmark.py).

    python scripts/benchmark_transformer.py                  # both tasks, every grid point
    python scripts/benchmark_transformer.py --tasks vit --json out.json
    python scripts/benchmark_transformer.py --write          # also update BENCHMARKS.md

Same as `kfac-benchmark-transformer`; see BENCHMARKS.md for results.
"""

import sys

from kfac_dist.jobs.transformer_benchmark import main

if __name__ == "__main__":
    sys.exit(main())
