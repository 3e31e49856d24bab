"""Multi-worker test worker: adaptive K-FAC (qmodel momentum, LM damping) in float64.

tests/integration/test_adaptive_multi_worker.py runs it as 2 workers and imports it for
the single-process reference. Writes `worker-<index>.npz` into --out: the
final weights and, per step, ρ, the damping, α, μ and the predicted change.
"""

import argparse
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 16
STEPS = 20
LOGGED = ("rho", "damping", "qmodel_alpha", "qmodel_mu", "qmodel_change")


def dataset() -> tf.data.Dataset:
    """Global batches in a fixed order; DATA sharding gives worker i the i-th
    slice of each global batch."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, 4))
    y = rng.integers(0, 3, size=STEPS * GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)


def regularized_model(seed: int = 2) -> keras.Model:
    """A small classifier with L2 kernel regularisers: model.losses enter ρ's losses."""
    keras.utils.set_random_seed(seed)
    regularizer = keras.regularizers.L2(0.01)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", kernel_regularizer=regularizer),
            keras.layers.Dense(3, activation="softmax", kernel_regularizer=regularizer),
        ]
    )


def build() -> keras.Model:
    import kfac_dist as kfac

    model = regularized_model()
    optimizer = kfac.Kfac(
        adaptive=True,
        damping=0.5,
        model=model,
        loss="sparse_categorical_crossentropy",
        estimation_mode="exact",
        invert_every=4,
        damping_adaptation_interval=5,
        seed=3,
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def train(model: keras.Model) -> dict[str, np.ndarray]:
    logs: dict[str, list[float]] = {key: [] for key in LOGGED}
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs=None, _out=logs: [
            _out[key].append(float(logs[key])) for key in LOGGED
        ]
    )
    model.fit(dataset(), epochs=1, shuffle=False, verbose=0, callbacks=[record])
    arrays = {f"weight/{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({key: np.array(values) for key, values in logs.items()})
    return arrays


def main() -> None:
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    with strategy.scope():
        model = build()
    np.savez(out / f"worker-{strategy.cluster_resolver.task_id}.npz", **train(model))


if __name__ == "__main__":
    main()
