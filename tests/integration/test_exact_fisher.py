"""Exact mode against an explicit Jacobian-built GGN, JᵀHJ, in float64.

The reference differentiates the model's outputs with respect to every weight
(J) and the compiled Keras loss twice with respect to the outputs' logits (H),
so it shares no code with the curvature: a "full" block must equal its
diagonal block of JᵀHJ. Covers sequence outputs (positions must not mix) and
the loss Keras actually trains on a softmax or sigmoid output.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac

B, T, D_IN, HIDDEN, D_OUT = 4, 3, 3, 4, 3


def _logits(output: tf.Tensor) -> tf.Tensor:
    """What Keras' cross-entropies take as logits of a softmax/sigmoid output."""
    return getattr(output, "_keras_logits", output)


def explicit_ggn(model, x, y, loss, logits_of_output) -> np.ndarray:
    """JᵀHJ over every trainable weight, J and H by autodiff (float64)."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        output = model(x, training=True)
        eta = logits_of_output(output)
    jacobians = [tape.jacobian(eta, v) for v in variables]
    n = int(np.prod(eta.shape))
    j = np.concatenate([jac.numpy().reshape(n, -1) for jac in jacobians], axis=1)
    eta_value = tf.constant(eta.numpy())
    with tf.GradientTape() as outer:
        outer.watch(eta_value)
        with tf.GradientTape() as inner:
            inner.watch(eta_value)
            value = loss(y, _as_output(output, eta_value))
        grad = inner.gradient(value, eta_value)
    h = outer.jacobian(grad, eta_value).numpy().reshape(n, n)
    return j.T @ h @ j


def _as_output(output, eta):
    """The model output rebuilt from logits, carrying them as Keras does."""
    if not hasattr(output, "_keras_logits"):
        return eta
    activation = (
        keras.activations.softmax
        if output.op.type == "Softmax" or "softmax" in output.name.lower()
        else keras.activations.sigmoid
    )
    return activation(eta)


def _train_one_exact_step(model, x, y, loss):
    opt = kfac.Kfac(
        learning_rate=1e-3,
        damping=1e-3,
        model=model,
        loss=loss,
        estimation_mode="exact",
        fisher_approx="full",
        cov_ema_decay=0.0,
        invert_every=1,
        momentum=0.0,
    )
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return opt


def _compare_blocks(opt, model, ggn):
    factors = [f.numpy() for f in opt.curvature.factors()]
    offset = 0
    for layer, factor in zip(model.layers, factors):
        size = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
        expected = ggn[offset : offset + size, offset : offset + size]
        np.testing.assert_allclose(factor, expected, rtol=1e-6, atol=1e-10 * np.abs(expected).max())
        offset += size


# Loss objects are made inside each test, after floatx is float64: a Keras loss
# computes in the floatx of its construction.
@pytest.mark.parametrize(
    "make_loss, labels",
    [
        (keras.losses.MeanSquaredError, "dense"),
        (lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse"),
        (lambda: keras.losses.MeanSquaredError(reduction="sum"), "dense"),
    ],
)
def test_exact_full_blocks_of_a_sequence_model_equal_the_explicit_ggn(float64, make_loss, labels):
    loss = make_loss()
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((T, D_IN)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(D_OUT),
        ]
    )
    # Values exact in float32: the data pipeline may pass through it.
    x = rng.normal(size=(B, T, D_IN)).astype(np.float32).astype(np.float64)
    y = (
        rng.integers(0, D_OUT, size=(B, T))
        if labels == "sparse"
        else rng.normal(size=(B, T, D_OUT))
    )
    y = y.astype(np.float32).astype(np.float64) if labels != "sparse" else y
    ggn = explicit_ggn(model, tf.constant(x), tf.constant(y), loss, _logits)
    opt = _train_one_exact_step(model, x, y, loss)
    _compare_blocks(opt, model, ggn)


@pytest.mark.parametrize(
    "activation, make_loss, labels",
    [
        ("softmax", keras.losses.BinaryCrossentropy, "binary"),
        ("sigmoid", keras.losses.CategoricalCrossentropy, "one_hot"),
        ("softmax", keras.losses.SparseCategoricalCrossentropy, "sparse"),
    ],
)
def test_exact_blocks_are_the_ggn_of_the_loss_keras_trains(float64, activation, make_loss, labels):
    """A softmax output under BCE trains sigmoid-BCE on the pre-activation (and a
    sigmoid under CCE softmax-CE): the Fisher is that loss's GGN."""
    loss = make_loss()
    rng = np.random.default_rng(1)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(D_OUT, activation=activation),
        ]
    )
    x = rng.normal(size=(B, D_IN)).astype(np.float32).astype(np.float64)
    if labels == "sparse":
        y = rng.integers(0, D_OUT, size=(B,))
    elif labels == "one_hot":
        y = np.eye(D_OUT)[rng.integers(0, D_OUT, size=B)]
    else:
        y = rng.integers(0, 2, size=(B, D_OUT)).astype(np.float64)
    pre_activation = keras.Sequential(
        [keras.Input((D_IN,)), *model.layers[:-1], keras.layers.Dense(D_OUT)]
    )
    pre_activation.layers[-1].set_weights(model.layers[-1].get_weights())

    def keras_loss(y_true, logits):
        return loss(y_true, getattr(keras.activations, activation)(logits))

    ggn = explicit_ggn(pre_activation, tf.constant(x), tf.constant(y), keras_loss, lambda o: o)
    opt = _train_one_exact_step(model, x, y, loss)
    _compare_blocks(opt, model, ggn)
