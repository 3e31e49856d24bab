"""K-FAC under mixed_float16: Keras' LossScaleOptimizer around Kfac, float32 curvature,
and one skip decision that every replica shares."""

import contextlib
import functools
import json
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist.checkpointing import StepCheckpoint
from tests.collectives import count_collectives
from tests.multiworker import assert_all_succeeded, run_workers
from tests.paths import WORKERS

WORKER = WORKERS / "mixed_float16_worker.py"
sys.path.insert(0, str(WORKER.parent))
import mixed_float16_worker as worker  # noqa: E402

BATCH = 16
STEPS = 4
INVERT_EVERY = 2
RNG = np.random.default_rng(5)
X = RNG.normal(size=(STEPS * BATCH, 5)).astype("float32")
Y = RNG.integers(0, 3, size=STEPS * BATCH)
# Keras' LossScaleOptimizer's state, which a rejected step moves, and K-FAC's skip counter.
LOSS_SCALE_STATE = ("dynamic_scale", "step_counter", "skipped_updates")


@contextlib.contextmanager
def dtype_policy(name: str):
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy("float32")


def mirrored() -> tf.distribute.Strategy:
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def build(
    policy: str,
    strategy=None,
    initial_scale=None,
    loss_weight=1.0,
    kfac_args=None,
    **loss_scale_args,
):
    """A small tanh/softmax MLP with exact-Fisher Kfac, compiled under `policy`."""
    with dtype_policy(policy), (strategy or tf.distribute.get_strategy()).scope():
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, activation="tanh"),
                keras.layers.Dense(3, activation="softmax"),
            ]
        )
        opt = kfac.Kfac(
            # Scaled with the loss, so that the update does not depend on it.
            damping=0.0625 * loss_weight,
            model=model,
            estimation_mode="exact",
            invert_every=INVERT_EVERY,
            seed=3,
            **(kfac_args or dict(learning_rate=0.2)),
        )
        optimizer = opt
        if initial_scale is not None:
            optimizer = keras.optimizers.LossScaleOptimizer(
                opt, initial_scale=initial_scale, **loss_scale_args
            )
        model.compile(
            optimizer=optimizer, loss="sparse_categorical_crossentropy", loss_weights=loss_weight
        )
    return model, opt


def state(model) -> dict[str, list[np.ndarray]]:
    """Every weight and optimizer variable (the wrapper's and Kfac's), replica by replica."""
    local = model.distribute_strategy.experimental_local_results
    variables = model.trainable_variables + model.optimizer.variables
    return {v.path: [np.array(t) for t in local(v.value)] for v in variables}


def changed(before, after) -> list[str]:
    return [
        path
        for path in before
        if any(not np.array_equal(b, a, equal_nan=True) for b, a in zip(before[path], after[path]))
    ]


def curvature(opt) -> list[np.ndarray]:
    """The factors every replica agrees on (synced first) and the inverses."""
    opt.sync_factors()
    return [np.array(f) for f in opt.curvature.factors()] + [
        np.array(v) for payload in opt.curvature.payloads for v in payload
    ]


def assert_close_to_float16_precision(got, want):
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=4e-3 * np.abs(w).max())


@functools.cache
def trained(policy: str, replicas: int = 1):
    model, opt = build(policy, mirrored() if replicas == 2 else None)
    with dtype_policy(policy):
        model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    return model, opt


def test_mixed_float16_trains_like_float32_to_float16_precision():
    reference, reference_opt = trained("float32")
    model, opt = trained("mixed_float16")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is opt
    assert model.layers[0].compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in opt.curvature.factor_sums)
    assert all(v.dtype == "float32" for p in opt.curvature.payloads for v in p)
    # No step was rejected; two inverse updates ran (steps 0 and 2).
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15
    assert int(opt.iterations.numpy()) == STEPS
    assert int(opt.curvature.inversions.numpy()) == 2 * 2 * 2
    assert_close_to_float16_precision(model.get_weights(), reference.get_weights())
    assert_close_to_float16_precision(curvature(opt), curvature(reference_opt))


def test_a_large_loss_scale_leaves_the_curvature_alone():
    # The state the dynamic scale grows into on a small loss: the loss's own
    # gradients fit float16 at s = 2**24, the curvature's backward passes
    # would not if they were scaled too (every step would be rejected).
    reference, reference_opt = build("float32", loss_weight=1e-4)
    model, opt = build("mixed_float16", initial_scale=2.0**24, loss_weight=1e-4)
    reference.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    with dtype_policy("mixed_float16"):
        history = model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    assert history.history["nonfinite_skips"] == [0.0]
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**24
    assert int(opt.iterations.numpy()) == STEPS
    assert_close_to_float16_precision(model.get_weights(), reference.get_weights())
    assert_close_to_float16_precision(curvature(opt), curvature(reference_opt))


def test_a_rejected_step_changes_nothing_and_training_goes_on_as_if_it_never_was():
    batches = [(X[i * BATCH : (i + 1) * BATCH], Y[i * BATCH : (i + 1) * BATCH]) for i in range(4)]
    reference, _ = build("mixed_float16")
    model, opt = build("mixed_float16")
    with dtype_policy("mixed_float16"):
        for x, y in (batches[0], batches[1], batches[3]):
            reference.train_on_batch(x, y)
        for x, y in batches[:2]:
            model.train_on_batch(x, y)
        before = state(model)
        # Step 2 is due to update the inverses. A scale this large overflows float16.
        model.optimizer.dynamic_scale.assign(2.0**40)
        logs = model.train_on_batch(*batches[2], return_dict=True)
        after = state(model)
        assert logs["nonfinite_skips"] == 1.0
        assert sorted(changed(before, after)) == sorted(
            path for path in before if path.endswith(LOSS_SCALE_STATE)
        )
        assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**39
        assert int(model.optimizer.step_counter.numpy()) == 0
        assert int(opt.iterations.numpy()) == 2
        # The next step is step 2 again: it updates the inverses, and samples
        # and schedules as the reference's step 2 did.
        model.optimizer.dynamic_scale.assign(2.0**15)
        model.train_on_batch(*batches[3])
    assert int(opt.iterations.numpy()) == 3
    reference_opt = reference.optimizer.inner_optimizer
    assert int(opt.curvature.inversions.numpy()) == int(reference_opt.curvature.inversions.numpy())
    for got, want in zip(
        model.get_weights() + curvature(opt), reference.get_weights() + curvature(reference_opt)
    ):
        np.testing.assert_array_equal(got, want)


def test_a_rejected_step_does_not_adapt_the_damping():
    model, opt = build(
        "mixed_float16", kfac_args=dict(adaptive=True, damping_adaptation_interval=1)
    )
    with dtype_policy("mixed_float16"):
        model.fit(X[: 2 * BATCH], Y[: 2 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
        before = state(model)
        model.optimizer.dynamic_scale.assign(2.0**40)
        model.train_on_batch(X[:BATCH], Y[:BATCH])
        after = state(model)
    # The quadratic model's α, μ and ρ are logs of the rejected step's attempt.
    assert sorted(changed(before, after)) == sorted(
        path for path in before if path.endswith((*LOSS_SCALE_STATE, "qmodel_state"))
    )


def test_the_loss_scale_grows_after_its_period_as_keras_does():
    model, opt = build("mixed_float16", initial_scale=2.0**10, dynamic_growth_steps=3)
    with dtype_policy("mixed_float16"):
        model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    # Doubled after 3 finite steps, then one more counted.
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**11
    assert int(model.optimizer.step_counter.numpy()) == 1
    assert int(opt.iterations.numpy()) == STEPS


def test_two_replicas_train_like_one_under_mixed_float16():
    reference, reference_opt = trained("mixed_float16")
    model, opt = trained("mixed_float16", replicas=2)
    assert float(model.optimizer.dynamic_scale.numpy()) == 2.0**15
    assert int(opt.iterations.numpy()) == STEPS
    assert_close_to_float16_precision(model.get_weights(), reference.get_weights())
    assert_close_to_float16_precision(curvature(opt), curvature(reference_opt))


def test_an_overflow_on_one_replica_rejects_the_step_on_every_replica():
    model, opt = build("mixed_float16", mirrored())
    bad = X[2 * BATCH : 3 * BATCH].copy()
    bad[3, 1] = 1e6  # past float16's range, in replica 0's half of the batch
    with dtype_policy("mixed_float16"):
        model.fit(X[: 2 * BATCH], Y[: 2 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
        before = state(model)
        # Step 2 is due to update the inverses (a factor sync and a sharing).
        history = model.fit(bad, Y[:BATCH], batch_size=BATCH, shuffle=False, verbose=0)
        after = state(model)
        assert history.history["nonfinite_skips"] == [1.0]
        assert sorted(changed(before, after)) == sorted(
            path for path in before if path.endswith(LOSS_SCALE_STATE)
        )
        scale = model.optimizer.dynamic_scale.path
        assert [float(s) for s in after[scale]] == [2.0**14] * 2
        model.fit(X[: 2 * BATCH], Y[: 2 * BATCH], batch_size=BATCH, shuffle=False, verbose=0)
    assert int(opt.iterations.numpy()) == 4
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert changed(after, state(model))


def test_mixed_float16_adds_no_collective():
    float32, _ = trained("float32", replicas=2)
    float16, _ = trained("mixed_float16", replicas=2)
    assert count_collectives(float16.train_function) == count_collectives(float32.train_function)


def test_a_saved_model_resumes_with_its_loss_scale(tmp_path):
    model, _ = build("mixed_float16", initial_scale=2.0**10, dynamic_growth_steps=3)
    with dtype_policy("mixed_float16"):
        model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
        model.save(tmp_path / "m.keras")
        loaded = kfac.keras.saving_utils.load_model(tmp_path / "m.keras")
        assert isinstance(loaded.optimizer, keras.optimizers.LossScaleOptimizer)
        assert loaded.optimizer.inner_optimizer.model is loaded
        assert loaded.optimizer.dynamic_growth_steps == 3
        assert float(loaded.optimizer.dynamic_scale.numpy()) == 2.0**11
        for a, b in zip(model.optimizer.variables, loaded.optimizer.variables):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=a.path)
        model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
        loaded.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(b, a)


def test_step_checkpoint_syncs_the_factors_of_a_wrapped_kfac(tmp_path):
    model, opt = build("mixed_float16", mirrored())
    checkpoint = StepCheckpoint(model, tmp_path, every_steps=STEPS, verbose=0)
    with dtype_policy("mixed_float16"):
        # The last step (3) folds without a sync: the replicas' sums differ until the save.
        model.fit(X, Y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[checkpoint])
    local = opt.context.strategy.experimental_local_results
    for variable in [*opt.curvature.factor_sums, opt.curvature.weight_sum]:
        first, second = (np.asarray(v) for v in local(variable.value))
        np.testing.assert_array_equal(second, first, err_msg=variable.path)


@pytest.mark.multiprocess
def test_two_workers_reject_the_same_overflowing_step_and_train_like_one_process(tmp_path):
    results = run_workers(WORKER, 2, ["--out", str(tmp_path)], timeout=300)
    assert_all_succeeded(results)
    reference, expected = worker.train(tf.distribute.get_strategy())
    # One step of five rejected (the scale halved once), on both workers alike.
    assert expected == {"loss_scale": 2.0**14, "iterations": 4, "nonfinite_skips": 1.0}
    for index in range(2):
        assert json.loads((tmp_path / f"worker-{index}.json").read_text()) == expected
    weights = [list(np.load(tmp_path / f"worker-{i}.npz").values()) for i in range(2)]
    for first, second in zip(*weights):
        np.testing.assert_array_equal(second, first)
    assert_close_to_float16_precision(weights[0], reference.get_weights())


def test_mixed_float16_with_gradient_accumulation_is_a_clear_error():
    model, _ = build(
        "mixed_float16", kfac_args=dict(learning_rate=0.2, gradient_accumulation_steps=2)
    )
    with pytest.raises(ValueError, match="gradient_accumulation_steps.*mixed_bfloat16"):
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)


def test_mixed_float16_around_a_multi_optimizer_is_a_clear_error():
    with dtype_policy("mixed_float16"):
        keras.utils.set_random_seed(7)
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(6, activation="tanh", name="hidden"),
                keras.layers.Dense(3, activation="softmax", name="head"),
            ]
        )
        opt = kfac.Kfac(learning_rate=0.2, damping=0.1, model=model, loss="mse")
        mapping = keras.optimizers.OptimizerMap(keras.optimizers.AdamW(1e-3), {"hidden/.*": opt})
        model.compile(optimizer=keras.optimizers.MultiOptimizer(mapping), loss="mse")
        with pytest.raises(ValueError, match="MultiOptimizer holding Kfac.*mixed_bfloat16"):
            model.fit(X, np.eye(3)[Y], batch_size=8, epochs=1, verbose=0)
