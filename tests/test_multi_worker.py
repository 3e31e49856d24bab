"""Keras `fit` under MultiWorkerMirroredStrategy with 2 real workers, fixed per model.

The workers (tests/workers/adam_fit_worker.py) run once for the whole module;
the reference is the same model trained in this process without a strategy.
"""

import importlib.util
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist import multi_worker
from tests.multiworker import assert_all_succeeded, run_workers
from tests.paths import WORKERS

WORKER = WORKERS / "adam_fit_worker.py"
NUM_WORKERS = 2


def _load_worker_module():
    spec = importlib.util.spec_from_file_location("adam_fit_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker_module()


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    x_val = rng.normal(size=(32, 8)).astype(np.float32)
    true_w = rng.normal(size=(8, 1)).astype(np.float32)
    shapes = [(8, 16), (16,), (16, 1), (1,)]
    initial = [0.5 * rng.normal(size=shape).astype(np.float32) for shape in shapes]
    return {
        "x": x,
        "y": np.sin(x @ true_w),
        "x_val": x_val,
        "y_val": np.sin(x_val @ true_w),
        **{f"w{i}": w for i, w in enumerate(initial)},
    }


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return _data()


@pytest.fixture(scope="module")
def workers(data, tmp_path_factory) -> list[tuple[dict, dict]]:
    """Each worker's (arrays, logs) after one 2-worker run of every scenario."""
    out = tmp_path_factory.mktemp("multi_worker_fit")
    np.savez(out / "data.npz", **data)
    results = run_workers(WORKER, NUM_WORKERS, ["--out", str(out)], timeout=180)
    assert_all_succeeded(results)
    return [
        (
            dict(np.load(out / f"worker-{index}.npz")),
            json.loads((out / f"worker-{index}.json").read_text()),
        )
        for index in range(NUM_WORKERS)
    ]


@pytest.fixture(scope="module")
def reference(data) -> tuple[dict, dict]:
    """The same training in one process without a strategy: arrays and logs."""
    model = worker.build_model([data[f"w{i}"] for i in range(4)])
    history = worker.fit(model, data, worker.EPOCHS)
    evaluate = model.evaluate(
        worker.dataset(data["x_val"], data["y_val"]), verbose=0, return_dict=True
    )
    arrays = {
        "predictions": model.predict(worker.dataset(data["x_val"]), verbose=0),
        **{f"w{i}": w for i, w in enumerate(model.get_weights())},
    }
    return arrays, {"history": history, "evaluate": evaluate}


@pytest.mark.multiprocess
def test_fit_fails_without_the_fix(workers):
    for _, logs in workers:
        assert "Attempt to convert a value (PerReplica" in logs["unfixed_error"]
        # Both halves are needed: with the build fixed, the log reduction fails.
        assert "Invalid reduction dimension 0" in logs["half_fixed_error"]


@pytest.mark.multiprocess
def test_fix_is_installed_once(workers):
    for _, logs in workers:
        assert not logs["enabled_before"]
        assert logs["enabled_after"]
        assert logs["idempotent"]


@pytest.mark.multiprocess
def test_workers_agree_bit_for_bit(workers):
    (arrays_0, logs_0), (arrays_1, logs_1) = workers
    assert arrays_0.keys() == arrays_1.keys()
    for name in arrays_0:
        np.testing.assert_array_equal(arrays_0[name], arrays_1[name], err_msg=name)
    assert logs_0["history"] == logs_1["history"]
    assert logs_0["evaluate"] == logs_1["evaluate"]


@pytest.mark.multiprocess
def test_two_workers_match_one_process_with_the_same_global_batch(workers, reference, data):
    (arrays, logs), _ = workers
    reference_arrays, reference_logs = reference
    for i in range(4):
        assert not np.allclose(arrays[f"w{i}"], data[f"w{i}"])  # it trained
        np.testing.assert_allclose(arrays[f"w{i}"], reference_arrays[f"w{i}"], rtol=1e-5, atol=1e-6)
    # predict gathers the workers' shards back in dataset order.
    np.testing.assert_allclose(
        arrays["predictions"], reference_arrays["predictions"], rtol=1e-5, atol=1e-6
    )
    # Logs are means over the global batch, as in one process.
    assert logs["history"].keys() == reference_logs["history"].keys()
    for name, values in logs["history"].items():
        np.testing.assert_allclose(values, reference_logs["history"][name], rtol=1e-5, err_msg=name)
    for name, value in logs["evaluate"].items():
        np.testing.assert_allclose(value, reference_logs["evaluate"][name], rtol=1e-5)


@pytest.mark.multiprocess
def test_fix_keeps_a_train_step_assigned_to_the_instance(workers):
    for _, logs in workers:
        assert logs["replaced_history"]["replaced"] == [1.0]
        assert np.isfinite(logs["replaced_history"]["loss"]).all()


@pytest.mark.multiprocess
def test_fix_rejects_steps_per_execution_above_1_up_front(workers):
    for _, logs in workers:
        assert logs["steps_per_execution_error"].startswith(
            "ValueError: steps_per_execution=2 does not work under MultiWorkerMirroredStrategy"
        )


@pytest.mark.parametrize("replicas", [1, 2])
def test_enable_is_a_no_op_without_multiple_workers(data, replicas):
    strategy = (
        tf.distribute.get_strategy()
        if replicas == 1
        else tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    )
    with strategy.scope():
        model = worker.build_model([data[f"w{i}"] for i in range(4)])
    attributes = dict(vars(model))
    assert multi_worker.enable_multi_worker_fit(model) is model
    assert vars(model) == attributes
    assert not multi_worker.is_multi_worker_fit_enabled(model)
    history = worker.fit(model, data, 1)
    assert np.isfinite(history["loss"]).all()


def test_fix_refuses_unverified_keras_versions():
    multi_worker._check_keras_version(keras.version())
    with pytest.raises(RuntimeError, match=r"3\.15\.x"):
        multi_worker._check_keras_version("3.16.0")
