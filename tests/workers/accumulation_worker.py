"""Multi-worker test worker: Kfac with gradient accumulation under MultiWorkerMirroredStrategy.

tests/test_accumulation.py runs it as 2 workers and imports it for the
single-process reference (one step per two micro-batches' union). Writes
`worker-<index>.npz` (the final weights) into --out.
"""

import argparse
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from kfac_fit_worker import mlp

MICRO_BATCH = 8  # global: each worker's shard is 4
STEPS = 6  # applied updates
K = 2


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(STEPS * K * MICRO_BATCH, 5)).astype("float32")
    y = rng.integers(0, 3, size=STEPS * K * MICRO_BATCH)
    return x, y


def dataset(batch: int) -> tf.data.Dataset:
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices(data()).batch(batch).with_options(options)


def build(**kfac_args) -> keras.Model:
    import kfac_dist as kfac

    model = mlp()
    optimizer = kfac.Kfac(
        learning_rate=0.2,
        damping=0.05,
        momentum=0.9,
        norm_constraint=1e-3,
        model=model,
        loss="sparse_categorical_crossentropy",
        estimation_mode="exact",
        invert_every=2,
        seed=3,
        **kfac_args,
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    with strategy.scope():
        model = build(gradient_accumulation_steps=K)
    model.fit(dataset(MICRO_BATCH), epochs=1, shuffle=False, verbose=0)
    index = strategy.cluster_resolver.task_id
    np.savez(out / f"worker-{index}.npz", *model.get_weights())


if __name__ == "__main__":
    main()
