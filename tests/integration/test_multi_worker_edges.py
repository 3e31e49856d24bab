"""Two real workers doing what users do: one retraces alone, the chief saves alone.

tests/workers/uneven_worker.py runs the scenarios once for the module (see
its docstring); every wait is bounded, so a hang fails the tests instead of
stalling the suite.
"""

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.multiworker import assert_all_succeeded, run_workers
from tests.paths import WORKERS

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "uneven_worker.py"
sys.path.insert(0, str(WORKER.parent))


@functools.cache
def _run(out: Path) -> list[dict[str, np.ndarray]]:
    results = run_workers(WORKER, 2, ["--out", str(out)], timeout=300)
    assert_all_succeeded(results)
    return [dict(np.load(out / f"worker-{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("uneven_workers")


@pytest.fixture(scope="module")
def workers(out) -> list[dict[str, np.ndarray]]:
    return _run(out)


def _phase(arrays: dict[str, np.ndarray], phase: str) -> list[np.ndarray]:
    keys = sorted((k for k in arrays if k.startswith(f"{phase}/")), key=lambda k: int(k[-1]))
    return [arrays[k] for k in keys]


def test_a_worker_that_retraces_alone_still_meets_its_peer(workers):
    # Worker 1's 7-row batch retraces its step; its factor sync and inverse
    # sharing keep the keys of worker 0's (not retraced) step.
    first, second = workers
    for phase in ("fit", "uneven", "after_save"):
        for a, b in zip(_phase(first, phase), _phase(second, phase), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=phase)
    for before, after in zip(_phase(first, "fit"), _phase(first, "uneven"), strict=True):
        assert np.isfinite(after).all()
        assert not np.array_equal(before, after)  # the uneven step trained


def test_chief_only_save_issues_no_collective_and_saves_the_chief_state(workers, out):
    import kfac_dist as kfac

    # Both workers trained one more step after the chief saved alone: no
    # collective was left waiting (else the run would have hung).
    first, _ = workers
    loaded = kfac.keras.saving_utils.load_model(out / "chief.keras")
    np.testing.assert_array_equal(loaded.optimizer.seed.numpy(), first["seed"])
    for want, got in zip(_phase(first, "uneven"), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    # The saved factor sums are the chief's own, as they were at the save.
    for want, got in zip(
        _phase(first, "local_sum"), loaded.optimizer.curvature.factor_sums, strict=True
    ):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_steps_per_execution_above_1_is_rejected_before_training(workers):
    for arrays in workers:
        message = str(arrays["steps_per_execution_error"])
        assert "steps_per_execution=2 does not work under MultiWorkerMirroredStrategy" in message
        assert "Compile with steps_per_execution=1" in message


def test_seed_none_is_the_chiefs_draw_on_every_worker(workers):
    first, second = workers
    assert first["seed"] == second["seed"]


def test_a_peer_that_stops_coming_ends_in_a_timeout_error_not_a_hang():
    # Worker 1 stays away (alive) after step 2; worker 0's next K-FAC collective
    # gives up after collective_timeout, and the job ends: worker 1 is stopped.
    timeout_s = 10
    results = run_workers(
        WORKERS / "stall_worker.py",
        2,
        ["--timeout", str(timeout_s), "--hold", "600"],
        timeout=300,  # a bound for a broken fix only
    )
    first, second = results
    assert not first.timed_out, first
    # Exit 3 after printing the error; rarely TensorFlow aborts the process
    # while it tears the timed-out collective down, after logging the timeout.
    assert first.exit_code != 0, first
    assert "Collective has timed out" in first.output, first
    assert second.exit_code != 0  # stopped with the job
