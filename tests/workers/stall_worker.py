"""Multi-worker test worker: a peer that stops coming must end in an error, not a hang.

tests/integration/test_multi_worker_edges.py runs it as 2 workers. Both train K-FAC with an
inverse update every step (so each step starts with K-FAC's factor sync) and
`collective_timeout=--timeout`; after step 2 worker 1 stays away (alive, busy
elsewhere: a sleep of --hold seconds), which TensorFlow's own health checks do
not see. Worker 0's next factor sync then times out: it prints the error and
exits 3.
"""

import argparse
import os
import time

import keras
import numpy as np
import tensorflow as tf


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import kfac_dist as kfac

    parser = argparse.ArgumentParser()
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--hold", type=float, default=600.0)
    args = parser.parse_args()
    index = strategy.cluster_resolver.task_id
    with strategy.scope():
        keras.utils.set_random_seed(7)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
        optimizer = kfac.Kfac(
            learning_rate=0.1,
            damping=0.05,
            model=model,
            loss="sparse_categorical_crossentropy",
            invert_every=1,
            seed=1,
            collective_timeout=args.timeout,
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16 * 20, 5)).astype("float32")
    y = rng.integers(0, 3, size=16 * 20)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    # Repeated: an infinite dataset needs no has-data all-reduce before each
    # step (the strategy's, untimed), so K-FAC's factor sync is the first wait.
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(16).with_options(options)
    hold = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: (
            time.sleep(args.hold) if index == 1 and int(optimizer.iterations.numpy()) == 2 else None
        )
    )
    try:
        model.fit(dataset, epochs=1, steps_per_epoch=20, callbacks=[hold], verbose=0)
    except tf.errors.DeadlineExceededError as error:
        print(f"worker {index}: {type(error).__name__}: {error.message}", flush=True)
        os._exit(3)  # a clean exit would wait for the absent peer
    print(f"worker {index}: finished", flush=True)


if __name__ == "__main__":
    main()
