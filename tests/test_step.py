"""Direct tests of the step's update (`step.update` through `Kfac.apply_step`).

The phases after the forward pass are driven with hand-made `StepInputs`:
known factor statistics, known gradients. Each check is against NumPy: the
folded factors, the exactly damped inverse (eigen method) and the update
−lr·(A⊗G + λI)⁻¹∇ of a Dense layer, [kernel; bias] as one matrix.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist.step import StepInputs

FAN_IN, UNITS, BATCH = 3, 2, 8
LR, DAMPING, DECAY = 0.5, 0.1, 0.5


def _spd(n, rng):
    m = rng.normal(size=(n, n))
    return m @ m.T / n + 0.5 * np.eye(n)


@pytest.fixture
def setting(float64):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((FAN_IN,)), keras.layers.Dense(UNITS)])
    optimizer = kfac.Kfac(
        learning_rate=LR,
        damping=DAMPING,
        momentum=0.0,
        cov_ema_decay=DECAY,
        invert_every=1,
        inverse_method="eigen",
        model=model,
        loss="mse",
    )
    model.compile(optimizer=optimizer, loss="mse")
    a, g = _spd(FAN_IN + 1, rng), _spd(UNITS, rng)
    grads = [rng.normal(size=(FAN_IN, UNITS)), rng.normal(size=(UNITS,))]
    return model, optimizer, a, g, grads


def _inputs(model, optimizer, statistics, index):
    curvature = optimizer.curvature
    batch = tf.constant(BATCH)
    return StepInputs(
        model=model,
        x=None,
        y_pred=None,
        sample_weights=[None],
        start_state=None,
        batch_size=batch,
        loss=tf.constant(0.0, tf.float64),
        loss_scaled=False,
        statistics=curvature.batch_statistics([tf.constant(s) for s in statistics], batch, None),
        is_statistics_step=tf.constant(True),
        index=tf.constant(index, tf.int64),
    )


def _apply(model, optimizer, grads, statistics=None, index=0):
    @tf.function
    def run():
        inputs = None if statistics is None else _inputs(model, optimizer, statistics, index)
        outcome = optimizer.apply_step(
            [tf.constant(g) for g in grads], model.trainable_variables, inputs
        )
        return outcome.finite

    return bool(run())


def _kfac_update(a, g, grads):
    gradient = np.concatenate([grads[0], grads[1][np.newaxis]], axis=0)
    curvature = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
    step = -LR * np.linalg.solve(curvature, gradient.ravel()).reshape(gradient.shape)
    return step[:-1], step[-1]


def test_an_update_folds_inverts_and_preconditions_as_numpy(setting):
    model, optimizer, a, g, grads = setting
    before = [w.copy() for w in model.get_weights()]
    assert _apply(model, optimizer, grads, statistics=[a, g])
    factors = [f.numpy() for f in optimizer.curvature.factors()]
    np.testing.assert_allclose(factors[0], a, rtol=1e-10)
    np.testing.assert_allclose(factors[1], g, rtol=1e-10)
    kernel_step, bias_step = _kfac_update(a, g, grads)
    after = model.get_weights()
    np.testing.assert_allclose(after[0] - before[0], kernel_step, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(after[1] - before[1], bias_step, rtol=1e-8, atol=1e-12)
    assert int(optimizer.iterations.numpy()) == 1


def test_an_update_without_inputs_folds_nothing_and_keeps_the_inverses(setting):
    model, optimizer, a, g, grads = setting
    _apply(model, optimizer, grads, statistics=[a, g])
    sums = [s.numpy().copy() for s in optimizer.curvature.factor_sums]
    before = [w.copy() for w in model.get_weights()]
    # As `optimizer.apply_gradients` outside the train step: the same preconditioner.
    assert _apply(model, optimizer, grads, statistics=None)
    for s, kept in zip(optimizer.curvature.factor_sums, sums):
        np.testing.assert_array_equal(s.numpy(), kept)
    kernel_step, bias_step = _kfac_update(a, g, grads)
    after = model.get_weights()
    np.testing.assert_allclose(after[0] - before[0], kernel_step, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(after[1] - before[1], bias_step, rtol=1e-8, atol=1e-12)


def test_non_finite_statistics_skip_the_whole_update(setting):
    model, optimizer, a, g, grads = setting
    _apply(model, optimizer, grads, statistics=[a, g])
    sums = [s.numpy().copy() for s in optimizer.curvature.factor_sums]
    payloads = [v.numpy().copy() for p in optimizer.curvature.payloads for v in p]
    weights = [w.copy() for w in model.get_weights()]
    bad = a.copy()
    bad[0, 0] = np.nan
    assert not _apply(model, optimizer, grads, statistics=[bad, g], index=1)
    for s, kept in zip(optimizer.curvature.factor_sums, sums):
        np.testing.assert_array_equal(s.numpy(), kept)
    for v, kept in zip((v for p in optimizer.curvature.payloads for v in p), payloads):
        np.testing.assert_array_equal(v.numpy(), kept)
    for w, kept in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(w, kept)
    assert optimizer.step_logs()["nonfinite_skips"] == 1.0
