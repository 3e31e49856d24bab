"""Multi-worker test worker: Kfac under mixed_float16 (a LossScaleOptimizer) on 2 workers.

tests/test_loss_scaling.py runs it as 2 workers and imports it for the
single-process reference. The third global batch overflows float16 on worker
0's slice only: both workers must reject that step. Writes
`worker-<index>.npz` (final weights) and `worker-<index>.json` (loss scale,
iterations, skips) into --out.
"""

import argparse
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from kfac_fit_worker import mlp

GLOBAL_BATCH = 16
BATCHES = 5
OVERFLOWING_BATCH = 2


def dataset() -> tf.data.Dataset:
    """Global batches in a fixed order; DATA sharding gives worker i the i-th
    slice of each global batch, so one process with the same batches is an
    exact reference."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(BATCHES * GLOBAL_BATCH, 5)).astype("float32")
    y = rng.integers(0, 3, size=BATCHES * GLOBAL_BATCH)
    x[OVERFLOWING_BATCH * GLOBAL_BATCH + 3, 1] = 1e6  # past float16's range, worker 0's slice
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH).with_options(options)


def train(strategy: tf.distribute.Strategy) -> tuple[keras.Model, dict]:
    """Builds under mixed_float16 inside `strategy.scope()` and fits one epoch."""
    import kfac_dist as kfac

    keras.config.set_dtype_policy("mixed_float16")
    try:
        with strategy.scope():
            model = mlp()
            optimizer = kfac.Kfac(
                learning_rate=0.2,
                damping=0.0625,
                model=model,
                estimation_mode="exact",
                invert_every=2,
                seed=3,
            )
            model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        history = model.fit(dataset(), epochs=1, shuffle=False, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    summary = {
        "loss_scale": float(model.optimizer.dynamic_scale.numpy()),
        "iterations": int(optimizer.iterations.numpy()),
        "nonfinite_skips": history.history["nonfinite_skips"][-1],
    }
    return model, summary


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    index = strategy.cluster_resolver.task_id
    model, summary = train(strategy)
    np.savez(out / f"worker-{index}.npz", *model.get_weights())
    (out / f"worker-{index}.json").write_text(json.dumps(summary))


if __name__ == "__main__":
    main()
