"""Test utility: run a worker script as N real TensorFlow workers on 127.0.0.1.

Each worker gets its own TF_CONFIG (free ports picked now) and a clean device
set-up: the logical-CPU split of tests/conftest.py belongs to the pytest
process only. Workers write their results (weights as .npy, histories as
JSON) into the output directory passed to them; the test compares the files.
If one worker fails, the others are stopped at once (a peer of a dead worker
would wait in a collective forever), and every wait is bounded by `timeout`.

    results = run_workers(WORKER, 2, ["--out", str(tmp_path)], timeout=120)
    assert_all_succeeded(results)

A test that runs workers carries the `multiprocess` marker (`python -m pytest
-m multiprocess` runs only those, `-m "not multiprocess"` the rest); running
workers from a test without it is an error, so the marker cannot go stale.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from kfac_dist.jobs import launch

ROOT = Path(__file__).resolve().parents[1]
MARKER = "multiprocess"
#: The test running now (set by tests/conftest.py), to check its marker.
current_test: list = []
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


@dataclasses.dataclass(frozen=True)
class WorkerResult:
    index: int
    exit_code: int
    output: str  # stdout and stderr, interleaved
    timed_out: bool

    def __str__(self) -> str:
        status = "timed out" if self.timed_out else f"exit code {self.exit_code}"
        return f"--- worker {self.index}: {status} ---\n{self.output}"


def run_workers(
    script: Path,
    num_workers: int,
    args: Sequence[str] = (),
    timeout: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> list[WorkerResult]:
    """Runs `python script *args` as worker 0..num_workers-1 of one cluster.

    `env` adds to (or overrides) the workers' environment. Returns when all
    workers have ended: successfully, after the first failure (the rest are
    stopped), or after `timeout` seconds (all are stopped).
    """
    require_marker()
    cluster = [f"127.0.0.1:{port}" for port in launch.free_ports(num_workers)]
    # Workers import kfac_dist from this checkout, installed or not.
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    base = {**os.environ, **WORKER_ENV, "PYTHONPATH": path, **(env or {})}
    envs = [launch.worker_env(cluster, index, base) for index in range(num_workers)]
    outputs: list[list[str]] = [[] for _ in range(num_workers)]
    timed_out = False
    with launch.WorkerGroup(
        [[sys.executable, str(script), *args]] * num_workers,
        envs,
        on_line=lambda index, line: outputs[index].append(line),
        grace_period=2.0,
    ) as group:
        try:
            group.wait(timeout)
        except TimeoutError:
            timed_out = True
    return [
        WorkerResult(index, launch.exit_code(code), "".join(lines), timed_out)
        for index, (code, lines) in enumerate(zip(group.returncodes, outputs, strict=True))
    ]


def require_marker() -> None:
    """Fails a test that starts worker processes without the `multiprocess` marker."""
    if current_test and current_test[0].get_closest_marker(MARKER) is None:
        raise RuntimeError(
            f"{current_test[0].nodeid} starts worker processes: mark it "
            f"@pytest.mark.{MARKER} (or set pytestmark in its module)."
        )


def assert_all_succeeded(results: Sequence[WorkerResult]) -> None:
    """Fails with every worker's output unless all exited 0."""
    if any(result.timed_out or result.exit_code != 0 for result in results):
        raise AssertionError("\n".join(str(result) for result in results))
