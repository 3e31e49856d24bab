"""ScaleShiftBlock against NumPy: the recorded x̂ of BatchNormalization and
LayerNormalization, and the diagonal / full Fisher of (γ, β) from per-example
gradients dγ_i = Σ_t g_t x̂_t, dβ_i = Σ_t g_t."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import CHOLESKY, DIAGONAL, EIGEN, FULL, ScaleShiftBlock

B, C = 4, 2


def _layer(kind: str, shape, seed=0):
    rng = np.random.default_rng(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rms_scaling is deprecated in Keras 3.15
        if kind == "bn":
            layer = keras.layers.BatchNormalization()
        elif kind == "bn_no_center":
            layer = keras.layers.BatchNormalization(center=False)
        elif kind == "ln":
            layer = keras.layers.LayerNormalization()
        elif kind == "ln_two_axes":
            layer = keras.layers.LayerNormalization(axis=(-2, -1))
        else:
            layer = keras.layers.LayerNormalization(rms_scaling=True)
    layer.build(shape)
    for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None)):
        if v is not None:
            v.assign(rng.normal(size=v.shape).astype(np.float32))
    return layer


def _numpy_normalized(kind, x):
    """x̂ as NumPy computes it from the layer's definition (ε = 1e-3)."""
    eps = 1e-3
    if kind.startswith("bn"):
        axes = tuple(range(x.ndim - 1))  # batch moments over all but channels
        return (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + eps)
    axes = (-2, -1) if kind == "ln_two_axes" else (-1,)
    var = x.var(axes, keepdims=True)
    if kind == "ln_rms":
        # Keras 3.15's (deprecated) rms_scaling: x / sqrt(var + ε), not centred.
        return x / np.sqrt(var + eps)
    return (x - x.mean(axes, keepdims=True)) / np.sqrt(var + eps)


CASES = {
    "bn": (B, 3, 2, 3),  # image: γ shared over (H, W)
    "bn_no_center": (B, 3),
    "ln": (B, 3, 4),  # sequence: γ shared over T
    "ln_two_axes": (B, 3, 4),  # γ of shape (T, d): nothing shared
    "ln_rms": (B, 2, 5),
}


def _recorded(kind, approx, seed=0):
    shape = CASES[kind]
    layer = _layer(kind, shape, seed)
    block = ScaleShiftBlock(layer, approx)
    rng = np.random.default_rng(seed + 1)
    x = (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)
    kwargs = {"training": True} if kind.startswith("bn") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        output, record = block.record(layer.call, tf.constant(x), **kwargs)
    grads = rng.normal(size=(C, *shape))
    return layer, block, x.astype(np.float64), output, record, grads


def _per_example_numpy(layer, x_hat, grads):
    """[dγ_i, dβ_i] for every column and example, summed over shared axes."""
    param_shape = tuple(layer.gamma.shape)
    n_param = len(param_shape)
    shared = tuple(range(2, grads.ndim - n_param))  # grads is (C, b, ..., params)
    parts = [np.sum(grads * x_hat, axis=shared).reshape(C * B, -1)]
    if getattr(layer, "beta", None) is not None:
        parts.append(np.sum(grads, axis=shared).reshape(C * B, -1))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("kind", list(CASES))
def test_recorded_normalized_input_matches_layer_definition(kind):
    layer, _, x, output, record, _ = _recorded(kind, None)
    x_hat = _numpy_normalized(kind, x)
    np.testing.assert_allclose(record.extras["normalized"].numpy(), x_hat, rtol=1e-4, atol=1e-5)
    # s = γ·x̂ + β is what the layer itself returned.
    beta = layer.beta.numpy() if getattr(layer, "beta", None) is not None else 0.0
    np.testing.assert_allclose(
        output.numpy(), layer.gamma.numpy() * x_hat + beta, rtol=1e-4, atol=1e-4
    )


def test_batch_norm_in_inference_normalizes_with_moving_moments():
    layer = _layer("bn", (B, 3))
    rng = np.random.default_rng(5)
    layer.moving_mean.assign(rng.normal(size=3).astype(np.float32))
    layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=3).astype(np.float32))
    block = ScaleShiftBlock(layer)
    x = rng.normal(size=(B, 3)).astype(np.float32)
    output, record = block.record(layer.call, tf.constant(x), training=False)
    x_hat = (x - layer.moving_mean.numpy()) / np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
    np.testing.assert_allclose(record.extras["normalized"].numpy(), x_hat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        output.numpy(),
        layer.gamma.numpy() * x_hat + layer.beta.numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_statistics_average_per_example_scale_and_shift_gradients(kind, approx):
    layer, block, x, _, record, grads = _recorded(kind, approx)
    (stat,) = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    per_example = _per_example_numpy(layer, _numpy_normalized(kind, x), grads)
    assert per_example.shape[1] == block.num_params
    if approx == DIAGONAL:
        expected = np.sum(per_example**2, axis=0) / B
    else:
        expected = per_example.T @ per_example / B
    assert tuple(stat.shape) == block.factor_shapes()[0]
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_per_example_reference_matches_autodiff_of_the_layer():
    """dγ_i, dβ_i of ⟨g_i, s_i⟩ with x̂ held fixed (LayerNorm is per example)."""
    layer, _, x, _, _, grads = _recorded("ln", DIAGONAL)
    per_example = _per_example_numpy(layer, _numpy_normalized("ln", x), grads)
    for i in range(B):
        with tf.GradientTape() as tape:
            s = layer.call(tf.constant(x[i : i + 1], tf.float32))
            pseudo = tf.reduce_sum(tf.constant(grads[0, i : i + 1], tf.float32) * s)
        gamma, beta = tape.gradient(pseudo, [layer.gamma, layer.beta])
        np.testing.assert_allclose(
            np.concatenate([gamma.numpy(), beta.numpy()]),
            per_example[i],
            rtol=1e-4,
            atol=1e-4,
        )


def test_diagonal_is_the_default_and_kron_is_rejected():
    layer = _layer("ln", (B, 3))
    assert ScaleShiftBlock(layer).approx == DIAGONAL
    with pytest.raises(ValueError, match="fisher_approx"):
        ScaleShiftBlock(layer, "kron")


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_precondition_applies_damped_inverse_to_scale_and_shift(approx, method):
    layer, block, _, _, record, grads = _recorded("bn", approx)
    (factor,) = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    damping = 0.3
    payload, _ = block.invert(0, [factor], damping, method)
    rng = np.random.default_rng(3)
    d_gamma, d_beta = rng.normal(size=3), rng.normal(size=3)
    new_gamma, new_beta = block.precondition(
        [tf.constant(d_gamma, tf.float32), tf.constant(d_beta, tf.float32)],
        [payload],
        damping,
        method,
    )
    f = factor.numpy().astype(np.float64)
    matrix = np.diag(f) if approx == DIAGONAL else f
    expected = np.linalg.solve(matrix + damping * np.eye(6), np.concatenate([d_gamma, d_beta]))
    np.testing.assert_allclose(
        np.concatenate([new_gamma.numpy(), new_beta.numpy()]),
        expected,
        rtol=1e-4,
        atol=1e-5,
    )


# --- batch renormalization and synchronized batch norm ------------------------

RENORM_MEAN = np.array([0.5, 1.0, 2.0])
RENORM_STDDEV = np.array([1.0, 3.0, 1.5])
CLIPPING = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}


def _renorm_layer(shape):
    layer = keras.layers.BatchNormalization(renorm=True, renorm_clipping=CLIPPING)
    layer.build(shape)
    layer.gamma.assign(np.array([0.5, -1.5, 2.0], np.float32))
    layer.renorm_mean.assign(RENORM_MEAN.astype(np.float32))
    layer.renorm_stddev.assign(RENORM_STDDEV.astype(np.float32))
    return layer


def _numpy_renormalized(x):
    """∂s/∂γ = r·x̂ + d of Ioffe (2017), r and d from the moving renorm moments, clipped."""
    axes = tuple(range(x.ndim - 1))
    mean, stddev = x.mean(axes), np.sqrt(x.var(axes) + 1e-3)
    r = np.clip(stddev / RENORM_STDDEV, CLIPPING["rmin"], CLIPPING["rmax"])
    d = np.clip((mean - RENORM_MEAN) / RENORM_STDDEV, -CLIPPING["dmax"], CLIPPING["dmax"])
    return r * (x - mean) / stddev + d


@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_batch_renorm_statistics_use_the_corrected_scale_gradient(approx):
    shape = (B, 2, 3)
    layer = _renorm_layer(shape)
    block = ScaleShiftBlock(layer, approx)
    rng = np.random.default_rng(7)
    x = (rng.normal(size=shape) * 2.0 + 1.0).astype(np.float32)
    output, record = block.record(layer.call, tf.constant(x), training=True)
    x_eff = _numpy_renormalized(x.astype(np.float64))
    # The layer's output is s = γ·(r·x̂ + d) + β, and the recorded ∂s/∂γ is r·x̂ + d.
    np.testing.assert_allclose(
        output.numpy(), layer.gamma.numpy() * x_eff + layer.beta.numpy(), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(record.extras["normalized"].numpy(), x_eff, rtol=1e-4, atol=1e-5)
    grads = rng.normal(size=(C, *shape))
    (stat,) = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    per_example = _per_example_numpy(layer, x_eff, grads)
    expected = (
        np.sum(per_example**2, axis=0) / B
        if approx == DIAGONAL
        else per_example.T @ per_example / B
    )
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_batch_renorm_scale_gradient_matches_autodiff_of_the_layer():
    """dγ of ⟨g, s⟩ through the layer (r, d held fixed, as Keras stops their gradient)."""
    shape = (B, 3)
    layer = _renorm_layer(shape)
    block = ScaleShiftBlock(layer)
    rng = np.random.default_rng(8)
    x = tf.constant((rng.normal(size=shape) * 2.0 + 1.0).astype(np.float32))
    g = tf.constant(rng.normal(size=shape).astype(np.float32))
    _, record = block.record(layer.call, x, training=True)
    layer.renorm_mean.assign(RENORM_MEAN.astype(np.float32))  # undo the moving update
    layer.renorm_stddev.assign(RENORM_STDDEV.astype(np.float32))
    with tf.GradientTape() as tape:
        pseudo = tf.reduce_sum(g * layer.call(x, training=True))
    (d_gamma,) = tape.gradient(pseudo, [layer.gamma])
    np.testing.assert_allclose(
        d_gamma.numpy(),
        np.sum(g.numpy() * record.extras["normalized"].numpy(), axis=0),
        rtol=1e-4,
        atol=1e-5,
    )


def _two_replicas() -> tf.distribute.MirroredStrategy:
    # The strategy's own collectives use group key 1 for any device set, and
    # instance keys from 100 in every strategy: tests of one process share
    # them only through this path (Keras' synchronized moments included).
    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def test_synchronized_batch_norm_records_global_batch_normalization_per_replica():
    strategy = _two_replicas()
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(8, 3)) * np.array([1.0, 2.0, 0.5]) + np.arange(3)).astype(np.float32)
    x[4:] += 3.0  # the two replicas' halves have different moments
    with strategy.scope():
        layer = keras.layers.BatchNormalization(synchronized=True)
        layer.build(x.shape)
    block = ScaleShiftBlock(layer)

    def replica_step(inputs):
        return block.record(layer.call, inputs, training=True)[1].extras["normalized"]

    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices(x).batch(8)
    )
    step = tf.function(lambda batch: strategy.run(replica_step, args=(batch,)))
    per_replica = step(next(iter(dataset)))
    recorded = np.concatenate([t.numpy() for t in strategy.experimental_local_results(per_replica)])
    global_x_hat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    np.testing.assert_allclose(recorded, global_x_hat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("replicas", [1, 2])
def test_renorm_and_synchronized_batch_norm_models_train_with_fit(replicas):
    import kfac_dist as kfac

    strategy = _two_replicas() if replicas == 2 else tf.distribute.get_strategy()
    rng = np.random.default_rng(10)
    x = rng.normal(size=(128, 4)).astype(np.float32)
    y = np.stack([np.tanh(x[:, 0] - x[:, 1]), x[:, 2] * x[:, 3]], axis=1).astype(np.float32)
    with strategy.scope():
        model = keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.BatchNormalization(renorm=True, name="renorm"),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.BatchNormalization(synchronized=True, name="synced"),
                keras.layers.Dense(2),
            ]
        )
        opt = kfac.Kfac(
            learning_rate=0.05, damping=0.1, model=model, loss="mse", invert_every=2, seed=0
        )
        model.compile(optimizer=opt, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=5, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0]
    assert {"renorm", "synced"} <= {b.name for b in opt.curvature.blocks}
    assert int(opt.curvature.inversions.numpy()) > 0


# --- GroupNormalization, RMSNormalization, UnitNormalization -------------------

# name: (input shape, layer arguments, channel axis of γ)
GROUP_CASES = {
    "gn": ((B, 2, 3, 4), dict(groups=2), -1),  # image: groups of 2 channels over (H, W)
    "gn_instance": ((B, 3, 4), dict(groups=-1), -1),  # one channel a group
    "gn_one_group": ((B, 3, 4), dict(groups=1, center=False), -1),
    "gn_channels_first": ((B, 4, 3), dict(groups=2, axis=1), 1),
    "rms": ((B, 3, 4), dict(), -1),
    "rms_two_axes": ((B, 3, 4), dict(axis=(-2, -1)), None),
}


def _norm_layer(kind: str, seed=0):
    shape, kwargs, _ = GROUP_CASES[kind]
    if kind.startswith("gn"):
        layer = keras.layers.GroupNormalization(**kwargs)
    else:
        layer = keras.layers.RMSNormalization(**kwargs)
    layer.build(shape)
    rng = np.random.default_rng(seed)
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape).astype(np.float32))
    return layer


def _scale_variable(layer):
    return layer.scale if isinstance(layer, keras.layers.RMSNormalization) else layer.gamma


def _numpy_group_normalized(kind, x):
    """x̂ from the layers' definitions: per example and group of channels (ε = 1e-3),
    or x / rms(x) over the normalised axes (ε = 1e-6)."""
    shape, kwargs, channel_axis = GROUP_CASES[kind]
    if kind.startswith("rms"):
        axes = tuple(kwargs.get("axis", (-1,)))
        return x / np.sqrt(np.mean(x**2, axis=axes, keepdims=True) + 1e-6)
    channels = shape[channel_axis]
    groups = channels if kwargs["groups"] == -1 else kwargs["groups"]
    moved = np.moveaxis(x, channel_axis, -1)
    grouped = moved.reshape(*moved.shape[:-1], groups, channels // groups)
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)  # all but example, group
    mean = grouped.mean(axes, keepdims=True)
    var = grouped.var(axes, keepdims=True)
    x_hat = ((grouped - mean) / np.sqrt(var + 1e-3)).reshape(moved.shape)
    return np.moveaxis(x_hat, -1, channel_axis)


def _broadcast(param, kind, ndim):
    """γ or β shaped to broadcast against the input."""
    _, _, channel_axis = GROUP_CASES[kind]
    if channel_axis is None:
        return param
    shape = [1] * ndim
    shape[channel_axis] = param.shape[0]
    return param.reshape(shape)


def _group_per_example_numpy(layer, kind, x_hat, grads):
    """[dγ_i, dβ_i] of every column and example: Σ over every axis γ is shared on."""
    _, _, channel_axis = GROUP_CASES[kind]
    ndim = x_hat.ndim  # grads is (C, *x.shape)
    if channel_axis is None:
        kept = set(range(ndim - 2, ndim))  # γ of shape (T, d): nothing shared
    else:
        kept = {channel_axis % ndim}
    shared = tuple(a + 1 for a in range(1, ndim) if a not in kept)
    parts = [np.sum(grads * x_hat, axis=shared).reshape(C * B, -1)]
    if getattr(layer, "beta", None) is not None:
        parts.append(np.sum(grads, axis=shared).reshape(C * B, -1))
    return np.concatenate(parts, axis=1)


def _group_recorded(kind, approx, seed=0):
    layer = _norm_layer(kind, seed)
    block = ScaleShiftBlock(layer, approx)
    rng = np.random.default_rng(seed + 1)
    shape = GROUP_CASES[kind][0]
    x = (rng.normal(size=shape) * 2.0 + 0.5).astype(np.float32)
    output, record = block.record(layer.call, tf.constant(x))
    grads = rng.normal(size=(C, *shape))
    return layer, block, x.astype(np.float64), output, record, grads


def test_group_and_rms_normalization_variables_are_gamma_beta_and_scale():
    """GroupNormalization's weights are `gamma` and `beta`, RMSNormalization's `scale`
    (γ, no shift); a `scale` flag (True on GroupNormalization) is not a variable."""
    names = {
        kind: [v.name for v in ScaleShiftBlock(_norm_layer(kind)).variables]
        for kind in ("gn", "gn_one_group", "rms", "rms_two_axes")
    }
    assert names == {
        "gn": ["gamma", "beta"],
        "gn_one_group": ["gamma"],
        "rms": ["scale"],
        "rms_two_axes": ["scale"],
    }
    assert ScaleShiftBlock(_norm_layer("rms_two_axes")).num_params == 12


@pytest.mark.parametrize("kind", list(GROUP_CASES))
def test_group_recorded_normalized_input_matches_layer_definition(kind):
    layer, _, x, output, record, _ = _group_recorded(kind, None)
    x_hat = _numpy_group_normalized(kind, x)
    np.testing.assert_allclose(record.extras["normalized"].numpy(), x_hat, rtol=1e-4, atol=1e-5)
    gamma = _broadcast(_scale_variable(layer).numpy(), kind, x.ndim)
    beta = layer.beta.numpy() if getattr(layer, "beta", None) is not None else np.zeros(1)
    np.testing.assert_allclose(
        output.numpy(), gamma * x_hat + _broadcast(beta, kind, x.ndim), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("kind", list(GROUP_CASES))
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_group_statistics_average_per_example_scale_and_shift_gradients(kind, approx):
    layer, block, x, _, record, grads = _group_recorded(kind, approx)
    (stat,) = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    per_example = _group_per_example_numpy(layer, kind, _numpy_group_normalized(kind, x), grads)
    assert per_example.shape[1] == block.num_params
    if approx == DIAGONAL:
        expected = np.sum(per_example**2, axis=0) / B
    else:
        expected = per_example.T @ per_example / B
    assert tuple(stat.shape) == block.factor_shapes()[0]
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["gn", "gn_channels_first", "rms_two_axes"])
def test_group_per_example_reference_matches_autodiff_of_the_layer(kind):
    """dγ_i, dβ_i of ⟨g_i, s_i⟩ through the layer: both normalise each example alone,
    so a batch of one gives example i's gradient."""
    layer, _, x, _, _, grads = _group_recorded(kind, DIAGONAL)
    per_example = _group_per_example_numpy(layer, kind, _numpy_group_normalized(kind, x), grads)
    for i in range(B):
        with tf.GradientTape() as tape:
            s = layer.call(tf.constant(x[i : i + 1], tf.float32))
            pseudo = tf.reduce_sum(tf.constant(grads[0, i : i + 1], tf.float32) * s)
        autodiff = tape.gradient(pseudo, layer.trainable_variables)
        np.testing.assert_allclose(
            np.concatenate([g.numpy().reshape(-1) for g in autodiff]),
            per_example[i],
            rtol=1e-4,
            atol=1e-4,
        )


def test_unit_normalization_has_no_weights_and_needs_no_block():
    """Keras 3's UnitNormalization (x/‖x‖) has no variables, trainable or not: a model
    with it registers its other layers and nothing for it."""
    import kfac_dist as kfac

    layer = keras.layers.UnitNormalization()
    layer.build((B, 3))
    assert layer.weights == []
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4), layer, keras.layers.Dense(2)]
    )
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")
    assert [type(b).__name__ for b in opt.curvature.blocks] == ["DenseBlock", "DenseBlock"]


def _explicit_ggn(model, x, y, loss):
    """JᵀHJ over every trainable weight, J and H by autodiff (no curvature code)."""
    with tf.GradientTape(persistent=True) as tape:
        output = model(x, training=True)
    n = int(np.prod(output.shape))
    j = np.concatenate(
        [tape.jacobian(output, v).numpy().reshape(n, -1) for v in model.trainable_variables],
        axis=1,
    )
    out = tf.constant(output.numpy())
    with tf.GradientTape() as outer:
        outer.watch(out)
        with tf.GradientTape() as inner:
            inner.watch(out)
            value = loss(y, out)
        grad = inner.gradient(value, out)
    h = outer.jacobian(grad, out).numpy().reshape(n, n)
    return j.T @ h @ j


@pytest.mark.parametrize("norm", ["group", "rms"])
def test_exact_full_group_and_rms_blocks_equal_the_explicit_ggn(float64, norm):
    """Exact mode: the "full" block of (γ, β) is its diagonal block of JᵀHJ."""
    import kfac_dist as kfac

    rng = np.random.default_rng(11)
    keras.utils.set_random_seed(11)
    layer = (
        keras.layers.GroupNormalization(groups=2, name="norm")
        if norm == "group"
        else keras.layers.RMSNormalization(name="norm")
    )
    model = keras.Sequential(
        [
            keras.Input((3, 4)),
            keras.layers.Dense(4, activation="tanh"),
            layer,
            keras.layers.Dense(2),
        ]
    )
    for v in layer.trainable_variables:
        v.assign(rng.normal(size=v.shape))
    x = rng.normal(size=(B, 3, 4)).astype(np.float32).astype(np.float64)
    y = rng.normal(size=(B, 3, 2)).astype(np.float32).astype(np.float64)
    loss = keras.losses.MeanSquaredError()
    ggn = _explicit_ggn(model, tf.constant(x), tf.constant(y), loss)
    opt = kfac.Kfac(
        learning_rate=1e-3,
        damping=1e-3,
        model=model,
        loss=loss,
        estimation_mode="exact",
        fisher_approx={"norm": FULL},
        cov_ema_decay=0.0,
        invert_every=1,
        momentum=0.0,
    )
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=B, epochs=1, verbose=0, shuffle=False)
    names = [b.name for b in opt.curvature.blocks]
    assert names == [model.layers[0].name, "norm", model.layers[2].name]
    start = len(model.layers[0].trainable_variables[0].numpy().reshape(-1)) + 4
    size = sum(int(np.prod(v.shape)) for v in layer.trainable_variables)
    factors = [f.numpy() for f in opt.curvature.factors()]
    norm_factor = factors[2]  # Dense's A and G come first
    expected = ggn[start : start + size, start : start + size]
    assert norm_factor.shape == expected.shape
    np.testing.assert_allclose(
        norm_factor, expected, rtol=1e-6, atol=1e-10 * np.abs(expected).max()
    )
