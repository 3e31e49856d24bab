"""K-FAC against Adam with 2 replicas: see kfac_dist/replica_benchmark.py."""

from kfac_dist.replica_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
