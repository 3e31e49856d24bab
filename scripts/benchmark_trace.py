"""First-fit trace time of K-FAC against Adam: see kfac_dist/jobs/trace_benchmark.py."""

from kfac_dist.jobs.trace_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
