"""Multi-worker test worker: Kfac training that checkpoints every K steps and resumes.

Run as 2 workers by tests/test_checkpointing.py. The same command starts or resumes:
it restores the latest checkpoint in --checkpoint-dir (if any), skips the
batches already trained on (a deterministic data order), and trains to
--steps. With --kill-at S, worker 1 kills itself with SIGKILL after step S.
Writes `worker-<index>.npz` (final weights, where its last save was written)
into --out.
"""

import argparse
import os
import signal
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 16


def dataset(skip: int) -> tf.data.Dataset:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8 * GLOBAL_BATCH, 5)).astype("float32")
    y = rng.integers(0, 3, size=8 * GLOBAL_BATCH)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    batches = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(GLOBAL_BATCH)
    return batches.skip(skip).with_options(options)


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import kfac_dist as kfac
    from kfac_dist.checkpointing import StepCheckpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--checkpoint-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()
    index = strategy.cluster_resolver.task_id

    with strategy.scope():
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        optimizer = kfac.Kfac(
            learning_rate=0.2,
            damping=0.05,
            model=model,
            loss="sparse_categorical_crossentropy",
            invert_every=3,
            seed=3,  # sampled Fisher: the RNG state is part of what resumes
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    checkpoint = StepCheckpoint(model, args.checkpoint_dir, every_steps=args.every)
    start = checkpoint.restore()
    callbacks = [checkpoint]
    if args.kill_at is not None and index == 1:
        callbacks.append(
            keras.callbacks.LambdaCallback(
                on_train_batch_end=lambda batch, logs: (
                    os.kill(os.getpid(), signal.SIGKILL)
                    if int(optimizer.iterations.numpy()) == args.kill_at
                    else None
                )
            )
        )
    model.fit(
        dataset(start),
        steps_per_epoch=args.steps - start,
        epochs=1,
        callbacks=callbacks,
        verbose=0,
    )
    np.savez(
        args.out / f"worker-{index}.npz",
        *model.get_weights(),
        start=start,
        write_path=str(checkpoint.last_write_path),
    )


if __name__ == "__main__":
    main()
