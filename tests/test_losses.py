"""Output losses against independent references: natural parameters, and the
output-space vectors u whose covariance must be b·∇²_η L of the compiled Keras
loss (exact, sampled) or the true-label gradient (empirical)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist import losses
from kfac_dist.losses import UnsupportedLossError, output_loss

B, T, K = 3, 2, 4
WEIGHT = 0.7

# name: (loss as the user passes it, predicts probabilities, labels kind)
LOSSES = {
    "mse": ("mse", False, "dense"),
    "mse_object": (keras.losses.MeanSquaredError(), False, "dense"),
    "categorical_logits": (
        keras.losses.CategoricalCrossentropy(from_logits=True),
        False,
        "one_hot",
    ),
    "categorical_probs": ("categorical_crossentropy", True, "one_hot"),
    "sparse_logits": (
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        False,
        "sparse",
    ),
    "sparse_probs": (keras.losses.SparseCategoricalCrossentropy(), True, "sparse"),
    "binary_logits": (
        keras.losses.BinaryCrossentropy(from_logits=True),
        False,
        "binary",
    ),
    "binary_probs": ("binary_crossentropy", True, "binary"),
    "categorical_smoothed": (
        keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2),
        False,
        "one_hot",
    ),
    "binary_smoothed": (
        keras.losses.BinaryCrossentropy(label_smoothing=0.2),
        True,
        "binary",
    ),
}
KIND = {
    "mse": losses.MSE,
    "categorical": losses.CATEGORICAL,
    "sparse": losses.SPARSE_CATEGORICAL,
    "binary": losses.BINARY,
}


def _kind(name):
    return KIND[name.split("_")[0]]


def _keras_loss(name, reduction="sum_over_batch_size"):
    """A fresh Keras loss object equal to the user's, for the references."""
    spec = LOSSES[name][0]
    if isinstance(spec, str):
        spec = keras.losses.get(
            {
                "mse": "MeanSquaredError",
                "categorical_crossentropy": "CategoricalCrossentropy",
                "binary_crossentropy": "BinaryCrossentropy",
            }[spec]
        )
    config = spec.get_config()
    config["reduction"] = reduction
    return type(spec).from_config(config)


def _prediction(name, eta):
    """The model output for natural parameters η (what the loss receives)."""
    if not LOSSES[name][1]:
        return eta
    if _kind(name) == losses.BINARY:
        return tf.sigmoid(eta)
    return tf.nn.softmax(eta)


def _labels(name, shape, rng):
    kind = LOSSES[name][2]
    lead = shape[:-1]
    if kind == "dense":
        return rng.normal(size=shape).astype(np.float32)
    if kind == "binary":
        return (rng.uniform(size=shape) < 0.5).astype(np.float32)
    classes = rng.integers(0, K, size=lead)
    if kind == "sparse":
        return classes.astype(np.int32)
    return np.eye(K, dtype=np.float32)[classes]


def _numpy_hessian(name, eta):
    """Hessian of one loss element (Keras averages MSE and BCE over K) w.r.t. η."""
    kind = _kind(name)
    if kind == losses.MSE:
        return np.broadcast_to(2.0 / K * np.eye(K), eta.shape + (K,))
    if kind == losses.BINARY:
        p = 1 / (1 + np.exp(-eta))
        return np.einsum("...k,kl->...kl", p * (1 - p), np.eye(K)) / K
    p = np.exp(eta - eta.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("...k,kl->...kl", p, np.eye(K)) - p[..., :, None] * p[..., None, :]


# (output shape, sample weight kind)
SETTINGS = {
    "batch": ((B, K), None),
    "batch_weighted": ((B, K), "per_example"),
    "sequence": ((B, T, K), None),
    "sequence_weighted": ((B, T, K), "per_example"),
    "sequence_weighted_per_step": ((B, T, K), "per_element"),
}


def _problem(name, setting, seed=0):
    rng = np.random.default_rng(seed)
    shape, weighting = SETTINGS[setting]
    logits = rng.normal(size=shape).astype(np.float32)
    y_true = _labels(name, shape, rng)
    if weighting is None:
        sample_weight = None
    elif weighting == "per_example":
        # Keras broadcasts (b,) weights over (b,) loss elements only; a sequence
        # output takes (b, 1).
        weight_shape = (B,) if len(shape) == 2 else (B, 1)
        sample_weight = rng.uniform(0.2, 2.0, size=weight_shape).astype(np.float32)
    else:
        sample_weight = rng.uniform(0.2, 2.0, size=shape[:-1]).astype(np.float32)
    loss = output_loss(LOSSES[name][0], weight=WEIGHT)
    y_pred = _prediction(name, tf.constant(logits))
    c = np.full(shape[:-1], WEIGHT / int(np.prod(shape[1:-1])))
    if sample_weight is not None:
        w = sample_weight.reshape(sample_weight.shape + (1,) * (c.ndim - sample_weight.ndim))
        c = c * w
    return loss, logits, y_pred, y_true, sample_weight, c


def _outer_sum(columns):
    u = np.stack([col.numpy() for col in columns])  # (columns, ..., K)
    return np.einsum("n...k,n...l->...kl", u, u)


def _autodiff_hessian_blocks(name, eta, y_true, sample_weight):
    """b·∂²L/∂η_{i,t}² of the compiled Keras loss L (times the loss weight)."""
    loss_fn = _keras_loss(name)
    eta = tf.constant(eta)
    with tf.GradientTape() as outer:
        outer.watch(eta)
        with tf.GradientTape() as inner:
            inner.watch(eta)
            value = WEIGHT * loss_fn(
                tf.constant(y_true), _prediction(name, eta), sample_weight=sample_weight
            )
        grad = inner.gradient(value, eta)
    hessian = outer.jacobian(grad, eta).numpy()  # (*η.shape, *η.shape)
    n = eta.shape.num_elements() // K  # loss elements
    flat = hessian.reshape(n, K, n, K)
    blocks = flat[np.arange(n), :, np.arange(n), :]  # (n, K, K)
    return eta.shape[0] * blocks.reshape(tuple(eta.shape) + (K,))


def test_string_and_object_losses_resolve_to_kind_and_logits_flag():
    for name, (spec, probs, _) in LOSSES.items():
        loss = output_loss(spec, weight=WEIGHT)
        assert loss.kind == _kind(name)
        assert loss.from_logits == (not probs and _kind(name) != losses.MSE)
        assert loss.weight == WEIGHT


@pytest.mark.parametrize("name", list(LOSSES))
def test_natural_params_recover_logits(name):
    loss, logits, y_pred, *_ = _problem(name, "sequence")
    eta = loss.natural_params(y_pred).numpy()
    if not LOSSES[name][1] or _kind(name) == losses.BINARY:
        np.testing.assert_allclose(eta, logits, rtol=1e-4, atol=1e-4)
    else:
        # Softmax logits are defined up to a constant per example.
        shift = eta - logits
        np.testing.assert_allclose(shift, np.broadcast_to(shift[..., :1], shift.shape), atol=1e-4)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_exact_vectors_square_to_scaled_loss_hessian(name, setting):
    loss, logits, y_pred, y_true, sample_weight, c = _problem(name, setting)
    eta = loss.natural_params(y_pred)
    columns = loss.vectors(eta, y_true, sample_weight, losses.EXACT, [1, 2])
    positions = int(np.prod(eta.shape[1:-1]))
    assert len(columns) == K * positions and all(col.shape == eta.shape for col in columns)
    fisher = _outer_sum(columns)
    expected = c[..., None, None] * _numpy_hessian(name, eta.numpy())
    np.testing.assert_allclose(fisher, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "setting", ["batch_weighted", "sequence_weighted", "sequence_weighted_per_step"]
)
@pytest.mark.parametrize("name", list(LOSSES))
def test_exact_vectors_square_to_batch_times_hessian_of_keras_loss(name, setting):
    """E[u uᵀ] = b·∇²_η L, with L the compiled Keras loss itself (autodiff)."""
    loss, logits, y_pred, y_true, sample_weight, _ = _problem(name, setting)
    eta = loss.natural_params(y_pred)
    columns = loss.vectors(eta, y_true, sample_weight, losses.EXACT, [1, 2])
    expected = _autodiff_hessian_blocks(name, eta.numpy(), y_true, sample_weight)
    np.testing.assert_allclose(_outer_sum(columns), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["mse", "sparse_logits", "binary_probs"])
def test_vectors_divide_by_sequence_length_unknown_when_traced(name):
    loss, logits, y_pred, y_true, sample_weight, c = _problem(name, "sequence_weighted")
    eta = loss.natural_params(y_pred)

    @tf.function(
        input_signature=[tf.TensorSpec([None, None, K]), tf.TensorSpec([None, 1])], autograph=False
    )
    def empirical(eta, weight):
        return loss.vectors(eta, y_true, weight, losses.EMPIRICAL, [1, 2])

    (traced,) = empirical(eta, sample_weight)
    (eager,) = loss.vectors(eta, y_true, sample_weight, losses.EMPIRICAL, [1, 2])
    np.testing.assert_allclose(traced.numpy(), eager.numpy(), rtol=1e-6)


def test_exact_mode_with_positions_unknown_when_traced_is_a_clear_error():
    loss, logits, y_pred, y_true, sample_weight, c = _problem("mse", "sequence")

    @tf.function(input_signature=[tf.TensorSpec([None, None, K])], autograph=False)
    def exact(eta):
        return loss.vectors(eta, None, None, losses.EXACT, [1, 2])

    with pytest.raises(ValueError, match="estimation_mode='exact' needs the output's positions"):
        exact(tf.constant(logits))


def _full_hessian(loss_fn, y_true, make_pred, eta, sample_weight=None):
    """b·∇²_η L per example, over every pair of its elements (cross-position terms
    included): (b, T·K, T·K)."""
    eta = tf.constant(eta)
    with tf.GradientTape() as outer:
        outer.watch(eta)
        with tf.GradientTape() as inner:
            inner.watch(eta)
            value = tf.reduce_sum(loss_fn(y_true, make_pred(eta), sample_weight=sample_weight))
        grad = inner.gradient(value, eta)
    hessian = outer.jacobian(grad, eta).numpy()
    b = eta.shape[0]
    n = eta.shape.num_elements() // b
    per_example = hessian.reshape(b, n, b, n)[np.arange(b), :, np.arange(b), :]
    return b * per_example


def _full_outer(columns):
    """Σ_columns u uᵀ per example: (b, T·K, T·K) (examples are never mixed)."""
    u = np.stack([col.numpy().reshape(col.shape[0], -1) for col in columns])
    return np.einsum("cbi,cbj->bij", u, u)


@pytest.mark.parametrize("name", ["mse", "sparse_logits", "categorical_probs", "binary_logits"])
def test_exact_vectors_of_a_sequence_output_have_no_cross_position_terms(name):
    loss, logits, y_pred, y_true, sample_weight, _ = _problem(name, "sequence_weighted_per_step")
    eta = loss.natural_params(y_pred)
    columns = loss.vectors(eta, y_true, sample_weight, losses.EXACT, [1, 2])
    keras_loss = _keras_loss(name)

    def weighted(y, pred, sample_weight):
        return WEIGHT * keras_loss(y, pred, sample_weight=sample_weight)

    expected = _full_hessian(
        weighted, tf.constant(y_true), lambda e: _prediction(name, e), eta.numpy(), sample_weight
    )
    np.testing.assert_allclose(_full_outer(columns), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("reduction", ["sum", None, "none", "mean", "sum_over_batch_size"])
@pytest.mark.parametrize("name", ["mse", "sparse_logits", "binary_probs"])
def test_exact_vectors_follow_the_reduction_keras_differentiates(name, reduction):
    """reduction=None: Keras' gradient sums the per-element losses, as 'sum' does."""
    spec = _keras_loss(name, reduction=reduction)
    loss = output_loss(spec)
    assert loss.reduction == reduction
    _, logits, y_pred, y_true, sample_weight, _ = _problem(name, "sequence_weighted")
    eta = loss.natural_params(y_pred)
    columns = loss.vectors(eta, y_true, sample_weight, losses.EXACT, [1, 2])
    expected = _full_hessian(
        spec, tf.constant(y_true), lambda e: _prediction(name, e), eta.numpy(), sample_weight
    )
    np.testing.assert_allclose(_full_outer(columns), expected, rtol=1e-3, atol=1e-6)


def test_mean_with_sample_weight_reduction_is_a_clear_error():
    with pytest.raises(UnsupportedLossError, match="mean_with_sample_weight"):
        output_loss(keras.losses.MeanSquaredError(reduction="mean_with_sample_weight"))


@pytest.mark.parametrize(
    "activation, spec",
    [
        (keras.activations.softmax, keras.losses.BinaryCrossentropy()),
        (keras.activations.sigmoid, keras.losses.CategoricalCrossentropy()),
        (keras.activations.sigmoid, keras.losses.SparseCategoricalCrossentropy()),
        (keras.activations.softmax, keras.losses.CategoricalCrossentropy()),
        (keras.activations.sigmoid, keras.losses.BinaryCrossentropy()),
    ],
)
def test_the_fisher_is_of_the_loss_keras_computes_on_the_output_pre_activation(activation, spec):
    """Keras takes a softmax or sigmoid output's pre-activation as logits for any
    cross-entropy: the Fisher is the Hessian of that loss in the pre-activation."""
    rng = np.random.default_rng(3)
    z = rng.normal(size=(B, K)).astype(np.float32)
    kind = output_loss(spec).kind
    if kind == losses.SPARSE_CATEGORICAL:
        y_true = rng.integers(0, K, size=(B,))
    elif kind == losses.CATEGORICAL:
        y_true = np.eye(K, dtype=np.float32)[rng.integers(0, K, size=B)]
    else:
        y_true = rng.integers(0, 2, size=(B, K)).astype(np.float32)
    loss = output_loss(spec)
    eta = loss.natural_params(activation(tf.constant(z)))
    np.testing.assert_allclose(eta.numpy(), z, rtol=1e-6)
    columns = loss.vectors(eta, y_true, None, losses.EXACT, [1, 2])
    expected = _full_hessian(spec, tf.constant(y_true), activation, z)
    np.testing.assert_allclose(_full_outer(columns), expected, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize(
    "name",
    ["mse", "categorical_logits", "sparse_probs", "binary_logits", "binary_probs"],
)
def test_sampled_vectors_average_to_scaled_loss_hessian(name):
    draws = 20000
    loss, logits, y_pred, y_true, sample_weight, c = _problem(name, "sequence_weighted")
    eta = loss.natural_params(y_pred)
    # One vectorised call: `draws` copies of the batch, each drawn independently.
    tiled_eta = tf.tile(eta, [draws, 1, 1])
    tiled_weight = np.tile(sample_weight, (draws, 1))
    tiled_true = np.tile(y_true, (draws,) + (1,) * (y_true.ndim - 1))
    (u,) = loss.vectors(tiled_eta, tiled_true, tiled_weight, losses.SAMPLED, [3, 4])
    u = u.numpy().reshape((draws,) + tuple(eta.shape))
    estimate = np.einsum("n...k,n...l->...kl", u, u) / draws
    expected = c[..., None, None] * _numpy_hessian(name, eta.numpy())
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(estimate, expected, atol=0.04 * scale)
    np.testing.assert_allclose(u.mean(0), 0.0, atol=0.04 * np.sqrt(scale))
    # Reproducible for a seed, different across seeds.
    first, again, other = (
        loss.vectors(eta, y_true, sample_weight, losses.SAMPLED, seed)[0].numpy()
        for seed in ([5, 6], [5, 6], [7, 8])
    )
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


@pytest.mark.parametrize("setting", ["batch_weighted", "sequence_weighted_per_step"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_empirical_vector_is_scaled_true_label_gradient(name, setting):
    loss, logits, y_pred, y_true, sample_weight, c = _problem(name, setting)
    eta = loss.natural_params(y_pred)
    (u,) = loss.vectors(eta, y_true, sample_weight, losses.EMPIRICAL, [1, 2])
    # ∂ℓ/∂η of each loss element, from the Keras loss with no reduction.
    per_element = _keras_loss(name, reduction=None)
    eta_var = tf.constant(eta.numpy())
    with tf.GradientTape() as tape:
        tape.watch(eta_var)
        elements = per_element(tf.constant(y_true), _prediction(name, eta_var))
        assert elements.shape == eta.shape[:-1]
        total = tf.reduce_sum(elements)
    element_grad = tape.gradient(total, eta_var).numpy()
    np.testing.assert_allclose(
        u.numpy(), np.sqrt(c)[..., None] * element_grad, rtol=1e-4, atol=1e-6
    )


@pytest.fixture
def float64():
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx(previous)


@pytest.mark.parametrize("mode", [losses.EXACT, losses.SAMPLED, losses.EMPIRICAL])
@pytest.mark.parametrize("name", ["mse", "categorical_probs", "sparse_logits", "binary_logits"])
def test_vectors_follow_float64_floatx(name, mode, float64):
    loss, logits, y_pred, y_true, sample_weight, c = _problem(name, "sequence_weighted")
    eta = loss.natural_params(tf.cast(y_pred, tf.float64))
    assert eta.dtype == tf.float64
    columns = loss.vectors(eta, y_true, sample_weight, mode, [1, 2])
    assert all(col.dtype == tf.float64 for col in columns)
    if mode == losses.EXACT:
        expected = c[..., None, None] * _numpy_hessian(name, eta.numpy())
        np.testing.assert_allclose(_outer_sum(columns), expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "spec, shown",
    [
        ("mae", "the loss 'mae':"),
        (keras.losses.Huber(), "the loss 'huber_loss':"),
        (
            keras.losses.mean_absolute_percentage_error,
            "the loss 'mean_absolute_percentage_error':",
        ),
        (
            keras.losses.BinaryFocalCrossentropy(),
            "the loss 'binary_focal_crossentropy':",
        ),
    ],
)
def test_unsupported_loss_error_names_loss_supported_list_and_escape_hatch(spec, shown):
    with pytest.raises(UnsupportedLossError) as info:
        output_loss(spec)
    message = str(info.value)
    assert shown in message
    for supported in losses.SUPPORTED_LOSSES:
        assert supported in message
    assert "LayerCollection.register_loss" in message
    assert isinstance(info.value, ValueError)
