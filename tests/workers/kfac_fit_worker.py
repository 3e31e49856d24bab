"""Multi-worker test worker: Kfac with `model.fit` under MultiWorkerMirroredStrategy.

tests/integration/test_multi_worker_kfac.py runs it as 2 workers and imports it for the
single-process reference. One process trains one model per configuration
(placement policy, factor sync); each gets its own Kfac and collective group.
Writes `worker-<index>.npz` (final weights per configuration) and
`worker-<index>.json` (the project's collective counters, and the
collectives counted in each traced train function, Adam's too) into --out.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

GLOBAL_BATCH = 16
STEPS = 20
INVERT_EVERY = 5
CONFIGS = tuple(
    (placement, sync)
    for placement in ("round_robin", "balanced", "replicated")
    for sync in ("lazy", "every_update")
)
#: Named configurations beyond the placement × sync grid: Kfac arguments each.
EXTRA_CONFIGS = {
    "distributed": {"inverse_replication": 0.0},
    "staggered": {"stagger_inverses": True},
}


def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, 5)).astype("float32")
    y = rng.integers(0, 3, size=STEPS * GLOBAL_BATCH)
    return x, y


def dataset() -> tf.data.Dataset:
    """Global batches in a fixed order; DATA sharding gives worker i the i-th
    slice of each global batch, so one process with the same batches is an
    exact reference."""
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return tf.data.Dataset.from_tensor_slices(data()).batch(GLOBAL_BATCH).with_options(options)


def mlp() -> keras.Model:
    """The small tanh/softmax MLP the multi-worker workers train (seeded)."""
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def build(placement: str, factor_sync: str, **extra) -> keras.Model:
    import kfac_dist as kfac

    model = mlp()
    optimizer = kfac.Kfac(
        learning_rate=0.2,
        damping=0.05,
        momentum=0.9,
        norm_constraint=1e-3,  # the KL clip of a momentum step engages
        model=model,
        loss="sparse_categorical_crossentropy",
        estimation_mode="exact",
        invert_every=INVERT_EVERY,
        placement=placement,
        factor_sync=factor_sync,
        seed=3,
        **extra,
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    return model


def graph_collectives(model: keras.Model) -> dict[str, int]:
    from tests.collectives import count_collectives

    return dataclasses.asdict(count_collectives(model.train_function))


def adam_graph_collectives(strategy) -> dict[str, int]:
    import kfac_dist as kfac

    with strategy.scope():
        model = mlp()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    kfac.enable_multi_worker_fit(model)
    model.fit(dataset(), epochs=1, shuffle=False, verbose=0)
    return graph_collectives(model)


def main() -> None:
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    index = strategy.cluster_resolver.task_id
    arrays, counts = {}, {}
    configs = [(f"{p}-{s}", p, s, {}) for p, s in CONFIGS]
    configs += [(name, "round_robin", "lazy", extra) for name, extra in EXTRA_CONFIGS.items()]
    for name, placement, factor_sync, extra in configs:
        with strategy.scope():
            model = build(placement, factor_sync, **extra)
        model.fit(dataset(), epochs=1, shuffle=False, verbose=0)
        for i, weight in enumerate(model.get_weights()):
            arrays[f"{name}/{i}"] = weight
        curvature = model.optimizer.curvature
        counts[name] = {
            **model.optimizer.context.counts(),
            "sharing_method": curvature.sharing_method,
            "shared_units": len(curvature.shared_units),
            "sharing_collectives": curvature.sharing.collectives,
            "graph": graph_collectives(model),
        }
    counts["adam"] = {"graph": adam_graph_collectives(strategy)}
    np.savez(out / f"worker-{index}.npz", **arrays)
    (out / f"worker-{index}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
