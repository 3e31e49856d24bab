"""gradient_accumulation_steps=k: k micro-batches of size b are one step on k·b (float64)."""

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import strategies
from tests.collectives import count_collectives
from tests.paths import WORKERS

K = 3  # micro-batches per update
MICRO_BATCH = 4
UPDATES = 5


def data(nan_row: int | None = None):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(K * MICRO_BATCH * UPDATES, 4))
    y = rng.integers(0, 3, size=len(x))
    if nan_row is not None:
        x[nan_row, 0] = np.nan
    return x, y


def mirrored() -> tf.distribute.Strategy:
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def train(strategy, batch_size, x, y, steps_per_execution=1, **kfac_args):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(5, activation="tanh"),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        # Halved on every update: equal only if the schedule counts updates.
        schedule = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=1, decay_rate=0.5)
        args = dict(
            learning_rate=schedule,
            damping=0.25,
            momentum=0.5,
            model=model,
            loss="sparse_categorical_crossentropy",
            estimation_mode="exact",
            seed=1,
        )
        opt = kfac.Kfac(**{**args, **kfac_args})
        model.compile(
            optimizer=opt,
            loss="sparse_categorical_crossentropy",
            steps_per_execution=steps_per_execution,
        )
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return model, opt


def first_replica(opt, variable) -> np.ndarray:
    return np.asarray(opt.context.strategy.experimental_local_results(variable)[0])


def state(model, opt) -> dict[str, list[np.ndarray]]:
    """Weights, velocities, factors (sums over their example total), inverses, counters."""
    opt.sync_factors()
    curvature = opt.curvature
    examples = first_replica(opt, curvature.weight_sum)[0]
    return {
        "weights": model.get_weights(),
        "velocities": [
            first_replica(opt, v) for v in opt.state.velocities + opt.state.velocity_curvatures
        ],
        "factors": [first_replica(opt, v) / examples for v in curvature.factor_sums],
        "inverses": [first_replica(opt, v) for p in curvature.payloads for v in p],
        "counters": [
            int(opt.iterations.numpy()),
            int(first_replica(opt, opt.state.skipped_updates)),
        ],
    }


def assert_same_state(got, want):
    for key in want:
        assert len(got[key]) == len(want[key]), key
        for a, b in zip(got[key], want[key]):
            assert np.isfinite(a).all(), key
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.parametrize(
    "invert_every, cov_update_every, clip",
    [(2, 1, {}), (3, 2, {}), (2, 1, {"norm_constraint": 1e-7})],  # the momentum step's KL clip
)
def test_k_micro_batches_update_as_one_step_on_their_union(
    float64, invert_every, cov_update_every, clip
):
    x, y = data()
    schedules = dict(invert_every=invert_every, cov_update_every=cov_update_every, **clip)
    model, opt = train(
        tf.distribute.get_strategy(), MICRO_BATCH, x, y, gradient_accumulation_steps=K, **schedules
    )
    reference = train(tf.distribute.get_strategy(), K * MICRO_BATCH, x, y, **schedules)
    assert_same_state(state(model, opt), state(*reference))
    if clip:
        assert first_replica(opt, opt.state.kl_clip) < 1.0
    inversions = [first_replica(o, o.curvature.inversions) for o in (opt, reference[1])]
    assert inversions == [4 * -(-UPDATES // invert_every)] * 2  # 4 factors per inverse update
    # Keras' own counter counts calls; the accumulators are empty after an update.
    assert int(opt._iterations.numpy()) == K * UPDATES
    assert all(not np.any(first_replica(opt, a)) for a in opt._accumulated_gradients)


def test_mirrored_accumulation_equals_one_device_step_on_the_union(float64):
    x, y = data()
    # Each replica sums its own 2-example shards; one all-reduce per update.
    schedules = dict(invert_every=2, norm_constraint=1e-7)
    model, opt = train(mirrored(), MICRO_BATCH, x, y, gradient_accumulation_steps=K, **schedules)
    reference = train(tf.distribute.get_strategy(), K * MICRO_BATCH, x, y, **schedules)
    assert_same_state(state(model, opt), state(*reference))
    inverse_updates = -(-UPDATES // 2)
    for replica in range(2):
        counts = opt.context.counts(replica)
        assert counts[strategies.GRADIENTS]["calls"] == UPDATES
        assert counts[strategies.FACTOR_SYNC]["calls"] == inverse_updates + 1  # + state()'s
    per_replica = count_collectives(model.train_function).per_replica(2)
    # The packed gradient all-reduce (ReductionToOneDevice issues no collective
    # op on its own path), then one factor sync and one sharing per inverse update.
    assert per_replica.per_step == 1
    assert per_replica.per_inverse_update == 1 + opt.curvature.sharing.collectives


def test_a_non_finite_micro_batch_skips_its_whole_update_as_in_one_large_batch(float64):
    # Update 1 holds rows 12..23: row 13 is in its first micro-batch.
    x, y = data(nan_row=13)
    model, opt = train(
        tf.distribute.get_strategy(),
        MICRO_BATCH,
        x,
        y,
        gradient_accumulation_steps=K,
        invert_every=2,
    )
    reference = train(tf.distribute.get_strategy(), K * MICRO_BATCH, x, y, invert_every=2)
    got, want = state(model, opt), state(*reference)
    assert want["counters"] == [UPDATES, 1]  # the reference skipped that update too
    assert_same_state(got, want)


def test_accumulation_round_trips_through_the_config():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    opt = kfac.Kfac(
        learning_rate=0.1, damping=0.1, model=model, loss="mse", gradient_accumulation_steps=4
    )
    config = opt.get_config()
    assert config["gradient_accumulation_steps"] == 4
    assert kfac.Kfac.from_config(config).gradient_accumulation_steps == 4


@pytest.mark.parametrize(
    "args, fragment",
    [
        (
            dict(gradient_accumulation_steps=1, learning_rate=0.1),
            "gradient_accumulation_steps must be >= 2",
        ),
        (dict(gradient_accumulation_steps=2, adaptive=True), "Use a larger batch"),
        (
            dict(gradient_accumulation_steps=2, learning_rate=0.1, adapt_damping=True),
            "adapt_damping",
        ),
    ],
)
def test_accumulation_with_what_it_cannot_serve_fails_at_construction(args, fragment):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match=fragment):
        kfac.Kfac(damping=0.1, model=model, loss="mse", **args)


@pytest.mark.multiprocess
def test_two_workers_accumulate_like_one_process_on_the_union(tmp_path):
    from tests.multiworker import assert_all_succeeded, run_workers

    script = WORKERS / "accumulation_worker.py"
    sys.path.insert(0, str(script.parent))
    import accumulation_worker as worker

    results = run_workers(script, 2, ["--out", str(tmp_path)], timeout=300)
    assert_all_succeeded(results)
    reference = worker.build()
    reference.fit(worker.dataset(worker.K * worker.MICRO_BATCH), epochs=1, shuffle=False, verbose=0)
    for index in range(2):
        weights = np.load(tmp_path / f"worker-{index}.npz")
        for i, want in enumerate(reference.get_weights()):
            np.testing.assert_allclose(weights[f"arr_{i}"], want, rtol=1e-4, atol=1e-6)
