"""Multi-worker test worker: the ordinary things users do that once hung the job.

tests/integration/test_multi_worker_edges.py runs it as 2 workers. One process, in order:

1. `Kfac(seed=None)` after seeding NumPy differently on each worker: the
   sampling seed must still agree;
2. `fit` on a `drop_remainder=True` dataset (8 rows per worker), then
   `train_on_batch` with 8 rows on both (both trace it), then once with 7
   rows on worker 1: only worker 1 retraces, and every step is an inverse
   update (K-FAC's factor sync and sharing run);
3. `model.save` on the chief only (no collective may be left waiting), then
   one more `train_on_batch` on both workers (their collectives still meet);
4. `fit` of a Kfac model compiled with steps_per_execution=2 (rejected).

Writes `worker-<index>.npz` (weights after each phase, the chief's local
factor sums at the save, the seed) into --out, and the chief's save as
`chief.keras`.
"""

import argparse
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

LOCAL_BATCH = 8
STEPS = 3


def data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(rows, 5)).astype("float32"), rng.integers(0, 3, size=rows)


def build() -> keras.Model:
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )
    return model


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    import kfac_dist as kfac

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    index = strategy.cluster_resolver.task_id

    with strategy.scope():
        model = build()
        np.random.seed(100 + index)  # each process' own draw for seed=None
        optimizer = kfac.Kfac(
            learning_rate=0.1,
            damping=0.05,
            model=model,
            loss="sparse_categorical_crossentropy",
            invert_every=1,
            seed=None,
            collective_timeout=120.0,
        )
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    x, y = data(2 * LOCAL_BATCH * STEPS, 1)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .batch(2 * LOCAL_BATCH, drop_remainder=True)
        .with_options(options)
    )
    model.fit(dataset, epochs=1, shuffle=False, verbose=0)
    arrays = {"seed": np.int64(optimizer.seed)}
    arrays.update({f"fit/{i}": w for i, w in enumerate(model.get_weights())})

    model.train_on_batch(*data(LOCAL_BATCH, 10 + index))  # both trace train_on_batch
    rows = LOCAL_BATCH - index  # then worker 1 has 7 rows: only it retraces
    x_local, y_local = data(rows, 20 + index)
    print("fit done", flush=True)
    model.train_on_batch(x_local, y_local)
    print("uneven step done", flush=True)
    arrays.update({f"uneven/{i}": w for i, w in enumerate(model.get_weights())})

    local_sums = [
        strategy.experimental_local_results(v)[0].numpy() for v in optimizer.curvature.factor_sums
    ]
    arrays.update({f"local_sum/{i}": s for i, s in enumerate(local_sums)})
    saved = out / "chief.keras"
    if index == 0:
        model.save(saved)
        print("chief saved", flush=True)
    model.train_on_batch(x_local, y_local)
    arrays.update({f"after_save/{i}": w for i, w in enumerate(model.get_weights())})

    with strategy.scope():
        looped = build()
        looped.compile(
            optimizer=kfac.Kfac(learning_rate=0.1, damping=0.05, model=looped, seed=1),
            loss="sparse_categorical_crossentropy",
            steps_per_execution=2,
        )
    try:
        looped.fit(dataset, epochs=1, verbose=0)
        arrays["steps_per_execution_error"] = ""
    except ValueError as error:
        arrays["steps_per_execution_error"] = str(error)
    np.savez(out / f"worker-{index}.npz", **arrays)


if __name__ == "__main__":
    main()
