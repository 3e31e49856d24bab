"""Test utility: where the repository and the worker scripts are, for tests at any depth."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Scripts run as real TensorFlow workers by `tests.multiworker.run_workers`.
WORKERS = ROOT / "tests" / "workers"
