"""Multi-worker test worker: Keras `fit` with Adam under MultiWorkerMirroredStrategy.

tests/test_multi_worker.py runs it as 2 workers and also imports it for the
model and data of its single-process reference. One process runs every
scenario, since each start of TensorFlow costs seconds:

1. unfixed: `fit` of a plain model (records the error Keras raises);
2. half fixed: only the symbolic build fixed (records the next error);
3. fixed: `fit` with a metric and validation data, `evaluate`, `predict`;
4. a `train_step` assigned to the instance after the fix, as K-FAC does;
5. the fix asked for a model compiled with steps_per_execution=2 (rejected).

Reads `data.npz` from --out and writes `worker-<index>.npz` (final weights,
predictions) and `worker-<index>.json` (logs, errors) there.
"""

import argparse
import json
import types
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from kfac_dist import multi_worker

GLOBAL_BATCH = 16
EPOCHS = 2


def build_model(initial_weights: list[np.ndarray]) -> keras.Model:
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    model.set_weights(initial_weights)
    return model


def dataset(*arrays: np.ndarray) -> tf.data.Dataset:
    """Global batches in a fixed order; DATA sharding gives worker i the i-th
    slice of each global batch, so one process with the same batches is an
    exact reference."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices(arrays).batch(GLOBAL_BATCH).with_options(options)


def fit(model: keras.Model, data: dict[str, np.ndarray], epochs: int) -> dict:
    return model.fit(
        dataset(data["x"], data["y"]),
        epochs=epochs,
        validation_data=dataset(data["x_val"], data["y_val"]),
        shuffle=False,  # The dataset's order is the reference's order.
        verbose=0,
    ).history


def _error_of(run) -> str | None:
    try:
        run()
    except Exception as error:  # noqa: BLE001 - any failure is the result.
        return f"{type(error).__name__}: {error}"
    return None


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    data = dict(np.load(out / "data.npz"))
    initial = [data[f"w{i}"] for i in range(4)]
    index = strategy.cluster_resolver.task_id
    results = {}

    with strategy.scope():
        unfixed = build_model(initial)
    results["unfixed_error"] = _error_of(lambda: fit(unfixed, data, 1))

    with strategy.scope():
        half_fixed = build_model(initial)
    half_fixed._maybe_symbolic_build = types.MethodType(
        multi_worker._maybe_symbolic_build, half_fixed
    )
    results["half_fixed_error"] = _error_of(lambda: fit(half_fixed, data, 1))

    with strategy.scope():
        model = build_model(initial)
    results["enabled_before"] = multi_worker.is_multi_worker_fit_enabled(model)
    multi_worker.enable_multi_worker_fit(model)
    overrides = dict(vars(model))
    multi_worker.enable_multi_worker_fit(model)
    results["enabled_after"] = multi_worker.is_multi_worker_fit_enabled(model)
    results["idempotent"] = all(
        vars(model)[name] is overrides[name] for name in multi_worker._FIX_ATTRIBUTES
    )
    results["history"] = fit(model, data, EPOCHS)
    results["evaluate"] = model.evaluate(
        dataset(data["x_val"], data["y_val"]), verbose=0, return_dict=True
    )
    predictions = model.predict(dataset(data["x_val"]), verbose=0)

    with strategy.scope():
        replaced = multi_worker.enable_multi_worker_fit(build_model(initial))
    keras_step = replaced.train_step
    replaced.train_step = lambda batch: {
        **keras_step(batch),
        "replaced": tf.constant(1.0),
    }
    results["replaced_history"] = fit(replaced, data, 1)

    with strategy.scope():
        looped = build_model(initial)
        looped.compile(optimizer="adam", loss="mse", steps_per_execution=2)
    results["steps_per_execution_error"] = _error_of(
        lambda: multi_worker.enable_multi_worker_fit(looped)
    )

    np.savez(
        out / f"worker-{index}.npz",
        predictions=predictions,
        **{f"w{i}": w for i, w in enumerate(model.get_weights())},
    )
    (out / f"worker-{index}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
