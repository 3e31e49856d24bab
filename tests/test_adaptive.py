"""Adaptive K-FAC: exact Fisher products, the quadratic model, LM damping, replicas."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import adaptive, losses, strategies

RNG = np.random.default_rng(5)
X = RNG.normal(size=(12, 4)).astype("float32")
LABELS = RNG.integers(0, 3, size=12)


def tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_fisher_products_equal_explicit_jacobian_products():
    model = tiny_model()
    variables = model.trainable_variables
    loss = losses.output_loss("sparse_categorical_crossentropy")
    v = [tf.constant(RNG.normal(size=w.shape), tf.float32) for w in variables]
    w = [tf.constant(RNG.normal(size=w_.shape), tf.float32) for w_ in variables]
    jv, etas = adaptive.output_tangents(model, X, variables, v, [loss])
    jw, _ = adaptive.output_tangents(model, X, variables, w, [loss])
    got = adaptive.fisher_products([loss], etas, jv, jw, [None], 12).numpy()

    # Reference: the explicit Jacobian of the logits (reverse mode), and the
    # softmax cross-entropy Hessian diag(p) − ppᵀ per example, in NumPy.
    with tf.GradientTape(persistent=True) as tape:
        logits = tf.math.log(model(X))
    jacobians = [tape.jacobian(logits, var).numpy().reshape(12, 3, -1) for var in variables]
    jac = np.concatenate(jacobians, axis=2)  # (b, K, P)
    p = model(X).numpy()
    flat_v = np.concatenate([t.numpy().ravel() for t in v])
    flat_w = np.concatenate([t.numpy().ravel() for t in w])
    ggn = sum(jac[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ jac[i] for i in range(12)) / 12
    np.testing.assert_allclose(got, flat_v @ ggn @ flat_w, rtol=1e-4)


@pytest.mark.parametrize("fixed_mu", [None, 0.7])
def test_qmodel_solution_equals_numpy(fixed_mu):
    m = np.array([[3.0, 0.5], [0.5, 2.0]])
    b = np.array([-1.0, 0.4])
    mu_arg = None if fixed_mu is None else tf.constant(fixed_mu, tf.float64)
    alpha, mu, change = adaptive.solve_qmodel(tf.constant(m), tf.constant(b), mu_arg)
    if fixed_mu is None:
        want = -np.linalg.solve(m, b)
    else:
        want = np.array([-(b[0] + fixed_mu * m[0, 1]) / m[0, 0], fixed_mu])
    np.testing.assert_allclose([alpha.numpy(), mu.numpy()], want, rtol=1e-12)
    np.testing.assert_allclose(change.numpy(), 0.5 * want @ m @ want + b @ want, rtol=1e-12)


def test_qmodel_first_step_without_previous_update_is_one_dimensional():
    m = np.array([[3.0, 0.0], [0.0, 0.0]])
    alpha, mu, _ = adaptive.solve_qmodel(tf.constant(m), tf.constant([-1.5, 0.0], tf.float64))
    assert alpha.numpy() == pytest.approx(0.5) and mu.numpy() == 0.0


def test_damping_follows_the_levenberg_marquardt_rule_on_a_scripted_rho_sequence():
    interval, decay, floor = 5, 0.95, 1e-3
    omega = decay**interval
    damping, expected = tf.constant(0.01, tf.float64), 0.01
    for rho in (0.9, 0.5, 0.1, 1.2, 0.76, 0.74, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9):
        damping = adaptive.adapt_damping(
            damping, tf.constant(rho, tf.float64), interval=interval, decay=decay, min_damping=floor
        )
        if rho > 0.75:
            expected *= omega
        elif rho < 0.25:
            expected /= omega
        expected = max(expected, floor)
        assert damping.numpy() == pytest.approx(expected, rel=1e-12)
    assert expected == floor  # the floor was reached


@pytest.mark.parametrize(
    "args, fragment",
    [
        (dict(adaptive=True, learning_rate=0.1), "learning_rate must be left out"),
        (dict(adaptive=True, momentum=0.5), "momentum must be left out"),
        (dict(adaptive=True, norm_constraint=0.01), "norm_constraint cannot be used"),
        (dict(momentum_type="nesterov", learning_rate=0.1), "momentum_type must be one of"),
    ],
)
def test_adaptive_argument_errors(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        kfac.Kfac(damping=1.0, model=tiny_model(), loss="sparse_categorical_crossentropy", **args)


def test_mutable_hyperparameters_exclude_what_adaptive_mode_controls():
    opt = kfac.Kfac(adaptive=True, damping=1.0, model=tiny_model(), loss="mse")
    assert "damping" not in opt.mutable_hyperparameters
    assert "learning_rate" not in opt.mutable_hyperparameters
    assert "momentum" not in opt.mutable_hyperparameters
    fixed = kfac.Kfac(momentum_type="qmodel_fixedmu", momentum=0.5, damping=1.0, model=tiny_model())
    assert "damping" in fixed.mutable_hyperparameters and not fixed.adapt_damping


STEPS, INTERVAL = 20, 5


@functools.cache
def adaptive_run(num_replicas):
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        if num_replicas == 1:
            strategy = tf.distribute.get_strategy()
        else:
            strategy = tf.distribute.MirroredStrategy(
                [f"/cpu:{i}" for i in range(num_replicas)],
                cross_device_ops=tf.distribute.ReductionToOneDevice(),
            )
        rng = np.random.default_rng(3)
        x = rng.normal(size=(STEPS * 16, 4))
        y = rng.integers(0, 3, size=STEPS * 16)
        with strategy.scope():
            model = tiny_model(seed=2)
            opt = kfac.Kfac(
                adaptive=True,
                damping=0.5,
                model=model,
                loss="sparse_categorical_crossentropy",
                estimation_mode="exact",
                invert_every=4,
                damping_adaptation_interval=INTERVAL,
            )
            model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        damping_log = []
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: damping_log.append(logs["damping"])
        )
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        return model, opt, history, damping_log
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def test_adaptive_mode_trains_and_logs_its_state():
    model, opt, history, _ = adaptive_run(1)
    for key in ("damping", "qmodel_alpha", "qmodel_mu", "qmodel_change", "rho"):
        assert key in history.history
    assert opt.curvature.factor_sums[0].dtype == "float64"
    assert np.isfinite(history.history["loss"]).all()
    assert float(opt.damping.numpy()) != 0.5  # the damping moved


def test_two_replicas_give_the_same_weights_and_damping_sequence_in_float64():
    one, _, _, damping_one = adaptive_run(1)
    two, opt, _, damping_two = adaptive_run(2)
    for a, b in zip(one.get_weights(), two.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(damping_two, damping_one, rtol=1e-8)
    counts = opt.context.counts(1)
    steps = 2 * STEPS
    assert counts[strategies.ADAPTIVE]["calls"] == steps + steps // INTERVAL
    assert counts[strategies.GRADIENTS]["calls"] == steps
