"""K-FAC against Adam with 2 replicas: see kfac_dist/jobs/replica_benchmark.py."""

from kfac_dist.jobs.replica_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
