"""Adaptive K-FAC: exact Fisher products, the quadratic model, LM damping, replicas."""

import functools
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import adaptive, losses, strategies
from tests.paths import WORKERS

sys.path.insert(0, str(WORKERS))
from adaptive_worker import regularized_model  # noqa: E402

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
    alpha, mu = adaptive.solve_qmodel(tf.constant(m), tf.constant(b), mu_arg)
    change = adaptive.quadratic_change(tf.constant(m), tf.constant(b), alpha, mu)
    if fixed_mu is None:
        want = -np.linalg.solve(m, b)
    else:
        want = np.array([-(b[0] + fixed_mu * m[0, 1]) / m[0, 0], fixed_mu])
    np.testing.assert_allclose([alpha.numpy(), mu.numpy()], want, rtol=1e-12)
    np.testing.assert_allclose(change.numpy(), 0.5 * want @ m @ want + b @ want, rtol=1e-12)


def test_qmodel_first_step_without_previous_update_is_one_dimensional():
    m = np.array([[3.0, 0.0], [0.0, 0.0]])
    alpha, mu = adaptive.solve_qmodel(tf.constant(m), tf.constant([-1.5, 0.0], tf.float64))
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
        # With regular momentum there is no predicted change: ρ would always be 0.
        (dict(adapt_damping=True, learning_rate=0.1), "only quadratic-model momentum"),
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
    assert "damping" in fixed.mutable_hyperparameters and not fixed.config.adapt_damping


STEPS, INTERVAL = 20, 5
LOGGED = ("rho", "damping", "qmodel_alpha", "qmodel_mu", "qmodel_change")


def adaptive_data():
    rng = np.random.default_rng(3)
    return rng.normal(size=(STEPS * 16, 4)), rng.integers(0, 3, size=STEPS * 16)


@functools.cache
def adaptive_run(num_replicas, regularized=False):
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
        x, y = adaptive_data()
        with strategy.scope():
            model = (regularized_model if regularized else tiny_model)(seed=2)
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
        logs = {key: [] for key in LOGGED}
        record = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs=None, _out=logs: [
                _out[key].append(float(logs[key])) for key in LOGGED
            ]
        )
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[record])
        return model, opt, history, logs
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def test_adaptive_mode_trains_and_logs_its_state():
    model, opt, history, _ = adaptive_run(1)
    for key in LOGGED:
        assert key in history.history
    assert opt.curvature.factor_sums[0].dtype == "float64"
    assert np.isfinite(history.history["loss"]).all()
    assert float(opt.damping.numpy()) != 0.5  # the damping moved


@pytest.mark.parametrize("num_replicas, regularized", [(2, False), (2, True), (4, True)])
def test_replicas_give_the_same_rho_damping_coefficients_and_weights_in_float64(
    num_replicas, regularized
):
    one, _, _, logs_one = adaptive_run(1, regularized)
    many, opt, _, logs_many = adaptive_run(num_replicas, regularized)
    for a, b in zip(one.get_weights(), many.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-12)
    for key in LOGGED:
        np.testing.assert_allclose(logs_many[key], logs_one[key], rtol=1e-8, atol=1e-12)
    # ρ is a ratio near 1 for good steps, not one scaled by the replica count.
    assert 0.0 < np.median(logs_one["rho"]) < 2.0
    counts = opt.context.counts(1)
    steps = 2 * STEPS
    assert counts[strategies.ADAPTIVE]["calls"] == steps + steps // INTERVAL
    assert counts[strategies.GRADIENTS]["calls"] == steps


def test_the_loss_after_the_step_keeps_float64_precision():
    model, *_ = adaptive_run(1, True)
    x, y = adaptive_data()

    measure = tf.function(adaptive.compiled_loss, autograph=False)
    value = measure(model, tf.constant(x[:16]), tf.constant(y[:16]), None)
    assert value.dtype == tf.float64


def test_nan_rho_raises_the_damping():
    damping = tf.constant(1.0, tf.float64)
    raised = adaptive.adapt_damping(
        damping, tf.constant(np.nan, tf.float64), interval=5, decay=0.9, min_damping=0.0
    )
    np.testing.assert_allclose(raised.numpy(), 1.0 / 0.9**5)


def test_measurements_at_unchanged_weights_reproduce_the_loss_with_dropout():
    """ρ's numerator at a zero step: the loss after the (null) step, measured from
    the step's starting state, equals the loss of the step's own forward pass, so
    both losses and the GGN products see the same dropout masks."""

    keras.utils.set_random_seed(4)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(3),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(loss=loss)
    x, y = tf.constant(X), tf.constant(LABELS)
    output = losses.output_loss(loss)

    @tf.function(autograph=False)
    def step():
        start = adaptive.model_state(model)
        y_pred = model(x, training=True)
        before = model.compute_loss(x, y, y_pred)
        after = adaptive.compiled_loss(model, x, y, None, start)
        variables = model.trainable_variables
        zeros = [tf.zeros_like(v) for v in variables]
        _, etas = adaptive.output_tangents(model, x, variables, zeros, [output], start)
        elsewhere = adaptive.compiled_loss(model, x, y, None)  # a fresh draw
        return before, after, etas[0], y_pred, elsewhere

    before, after, eta, y_pred, elsewhere = step()
    np.testing.assert_allclose(after.numpy(), before.numpy(), rtol=1e-6)
    np.testing.assert_allclose(eta.numpy(), y_pred.numpy(), rtol=1e-6)
    assert abs(float(elsewhere) - float(before)) > 1e-4  # dropout is really on


@pytest.mark.parametrize("include_damping", [False, True])
@pytest.mark.parametrize("weight_decay", [None, 0.375])
def test_first_qmodel_step_of_a_linear_model_equals_numpy(include_damping, weight_decay):
    """δ = 0 at the first step: α = −⟨g, Δ⟩ / Δᵀ(F + wd + λ)Δ with Δ = (F + λ)⁻¹g and
    g = ∇ + wd·θ (coupled weight decay); the predicted change is that of the
    model with or without the damping term. F = A ⊗ (2/d)I exactly here."""
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        rng = np.random.default_rng(8)
        # Values exact in float32: the data pipeline may pass through it.
        x = rng.normal(size=(16, 4)).astype(np.float32).astype(np.float64)
        y = rng.normal(size=(16, 3)).astype(np.float32).astype(np.float64)
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        damping = 0.25  # exact in float32, as the hyperparameter variables are
        opt = kfac.Kfac(
            momentum_type="qmodel",
            damping=damping,
            model=model,
            loss="mse",
            estimation_mode="exact",
            inverse_method="eigen",
            cov_ema_decay=0.0,
            invert_every=1,
            weight_decay_coeff=weight_decay,
            include_damping_in_quad_change=include_damping,
        )
        model.compile(optimizer=opt, loss="mse")
        theta = np.concatenate([model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()[None]])
        history = model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        after = np.concatenate([model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()[None]])
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")
    wd = weight_decay or 0.0
    inputs = np.concatenate([x, np.ones((16, 1))], axis=1)
    fisher = np.kron(inputs.T @ inputs / 16, 2.0 / 3 * np.eye(3))  # row-major vec(θ)
    grad = (2.0 / (16 * 3) * inputs.T @ (inputs @ theta - y)).reshape(-1) + wd * theta.reshape(-1)
    eye = np.eye(fisher.shape[0])
    delta = np.linalg.solve(fisher + damping * eye, grad)
    curvature = delta @ (fisher + wd * eye) @ delta
    alpha = -(grad @ delta) / (curvature + damping * delta @ delta)
    np.testing.assert_allclose(after.reshape(-1), theta.reshape(-1) + alpha * delta, rtol=1e-8)
    quadratic = curvature + (damping * delta @ delta if include_damping else 0.0)
    change = 0.5 * alpha**2 * quadratic + alpha * (grad @ delta)
    np.testing.assert_allclose(history.history["qmodel_change"][0], change, rtol=1e-8)
    np.testing.assert_allclose(history.history["qmodel_alpha"][0], alpha, rtol=1e-8)
