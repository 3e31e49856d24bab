"""Kfac with `model.fit` on 2 real worker processes (MultiWorkerMirroredStrategy)."""

import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.multiworker import assert_all_succeeded, run_workers
from tests.paths import WORKERS

pytestmark = pytest.mark.multiprocess

WORKER = WORKERS / "kfac_fit_worker.py"
sys.path.insert(0, str(WORKER.parent))
import kfac_fit_worker as worker  # noqa: E402


@functools.cache
def worker_results(out: Path):
    results = run_workers(WORKER, 2, ["--out", str(out)], timeout=300)
    assert_all_succeeded(results)
    return [
        (dict(np.load(out / f"worker-{i}.npz")), json.loads((out / f"worker-{i}.json").read_text()))
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return worker_results(tmp_path_factory.mktemp("kfac_workers"))


@functools.cache
def reference_weights(stagger: bool = False):
    model = worker.build("round_robin", "lazy", stagger_inverses=stagger)
    model.fit(worker.dataset(), epochs=1, shuffle=False, verbose=0)
    return model.get_weights()


@pytest.mark.parametrize("name", list(worker.EXTRA_CONFIGS))
def test_two_workers_distributed_or_staggered_train_like_one_process(results, name):
    reference = reference_weights(stagger=name == "staggered")
    for arrays, _ in results:
        for i, want in enumerate(reference):
            np.testing.assert_allclose(arrays[f"{name}/{i}"], want, rtol=1e-4, atol=1e-5)
    first, second = results[0][0], results[1][0]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_two_workers_distributed_precondition_with_one_more_all_reduce_per_step(results):
    for _, counts in results:
        adam, got = counts["adam"]["graph"], counts["distributed"]
        assert got["preconditioned"]["calls"] == worker.STEPS
        assert got["inverse_share"]["calls"] == 0  # every block distributed: nothing shared
        assert got["graph"]["per_step"] == adam["per_step"] + 1
        assert got["graph"]["per_inverse_update"] == 1  # the factor sync alone
        staggered = counts["staggered"]
        # Each step syncs its slot: the MLP's 4 units fill 4 of the period's 5 steps.
        idle = sum(1 for step in range(1, worker.STEPS) if step % worker.INVERT_EVERY >= 4)
        assert staggered["factor_sync"]["calls"] == worker.STEPS - idle
        assert staggered["graph"]["per_step"] == adam["per_step"]


@pytest.mark.parametrize("placement, factor_sync", worker.CONFIGS)
def test_two_workers_train_like_one_process_on_the_global_batch(results, placement, factor_sync):
    name = f"{placement}-{factor_sync}"
    reference = reference_weights()
    for arrays, _ in results:
        for i, want in enumerate(reference):
            np.testing.assert_allclose(arrays[f"{name}/{i}"], want, rtol=1e-4, atol=1e-5)
    first, second = results[0][0], results[1][0]
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


@pytest.mark.parametrize("placement, factor_sync", worker.CONFIGS)
def test_two_workers_keep_the_communication_budget(results, placement, factor_sync):
    inverse_updates = -(-worker.STEPS // worker.INVERT_EVERY)
    for _, counts in results:
        count = counts[f"{placement}-{factor_sync}"]
        assert count["gradients"]["calls"] == worker.STEPS
        syncs = worker.STEPS if factor_sync == "every_update" else inverse_updates
        assert count["factor_sync"]["calls"] == syncs
        if placement == "replicated":
            assert count["sharing_method"] is None
            assert count["inverse_share"]["calls"] == 0
        else:
            # Multi-worker: each owner broadcasts its factors' inverses, packed.
            assert count["sharing_method"] == "broadcast"
            assert count["sharing_collectives"] == 2 < count["shared_units"]
            assert count["inverse_share"]["calls"] == 2 * inverse_updates


@pytest.mark.parametrize("placement, factor_sync", worker.CONFIGS)
def test_traced_graph_has_adams_collectives_per_step_and_sync_and_sharing_per_update(
    results, placement, factor_sync
):
    # Counted in each worker's traced train function: K-FAC's logs cost no
    # collective, and an inverse update is one factor sync and one sharing phase.
    for _, counts in results:
        adam, got = counts["adam"]["graph"], counts[f"{placement}-{factor_sync}"]
        assert adam["per_inverse_update"] == 0 and adam["per_step"] >= 1
        every_step_sync = int(factor_sync == "every_update")
        assert got["graph"]["per_step"] == adam["per_step"] + every_step_sync
        sync = int(factor_sync == "lazy")
        assert got["graph"]["per_inverse_update"] == sync + got["sharing_collectives"]
