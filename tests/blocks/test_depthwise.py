"""DepthwiseConvBlock against a NumPy im2col: one Kronecker pair per channel, kept as one
grouped pair; the preconditioned update against NumPy's block-diagonal solve; one exact
step to least squares; a MobileNet-like model registered and trained.

The im2col and the block-diagonal reference here serve the separable and grouped
convolution tests too.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist.blocks import (
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    KRON,
    DepthwiseConvBlock,
    GenericDiagonalBlock,
)
from kfac_dist.curvature import inversion_units

B, C = 3, 2  # examples, output columns of the pseudo-loss
DAMPING = 0.05


# --- NumPy references shared by the convolution tests ----------------------------


def im2col(x, kernel_size, strides, dilation, padding):
    """(b, positions, kernel positions, channels) patches of a channels-last input.

    Kernel positions are row-major over the kernel's axes, as a (*kernel_size,
    channels, ...) kernel is laid out; 'same' pads as TensorFlow does (total
    max((O-1)·s + (k-1)·d + 1 - size, 0), the smaller half before), 'causal' pads
    (k-1)·d zeros on the left of a sequence.
    """
    if padding == "causal":
        x = np.pad(x, [(0, 0), ((kernel_size[0] - 1) * dilation[0], 0), (0, 0)])
        padding = "valid"
    b, *sizes, channels = x.shape
    out, before = [], []
    for size, k, s, d in zip(sizes, kernel_size, strides, dilation, strict=True):
        span = (k - 1) * d + 1
        o = (size - span) // s + 1 if padding == "valid" else -(-size // s)
        out.append(o)
        before.append(0 if padding == "valid" else max((o - 1) * s + span - size, 0) // 2)
    patches = np.zeros((b, *out, *kernel_size, channels))
    for position in np.ndindex(*out):
        for offset in np.ndindex(*kernel_size):
            source = [
                p * s - bf + q * d
                for p, s, bf, q, d in zip(position, strides, before, offset, dilation, strict=True)
            ]
            if all(0 <= i < n for i, n in zip(source, sizes, strict=True)):
                patches[(slice(None), *position, *offset)] = x[(slice(None), *source)]
    return patches.reshape(b, int(np.prod(out)), int(np.prod(kernel_size)), channels)


def layer_patches(layer, x):
    """The NumPy patches of the layer's (channels-last) input."""
    if layer.data_format == "channels_first":
        x = np.moveaxis(x, 1, -1)
    return im2col(x, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)


def channels_last(tensor, layer, column_axis=False):
    if layer.data_format != "channels_first":
        return tensor
    return np.moveaxis(tensor, 2 if column_axis else 1, -1)


def with_ones(rows):
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def kron_moments(inputs, outputs, batch):
    """A = Σ ā āᵀ / b over the input rows, G = Σ g gᵀ / (rows) over the output rows."""
    inputs = inputs.reshape(-1, inputs.shape[-1])
    outputs = outputs.reshape(-1, outputs.shape[-1])
    positions = len(inputs)
    return inputs.T @ inputs / batch, outputs.T @ outputs / positions


def block_diagonal_update(pairs, indices, grad_flat, method, damping=DAMPING):
    """(⊕_j F_j + damping)⁻¹ ∇ over the parameter vector, F_j a Kronecker pair.

    `pairs` [(A_j, G_j)], `indices[j]` the positions in the flat parameter vector
    of pair j's (input row, output column) entries, row-major: what
    vec(A X G) = (A ⊗ G) vec(X) multiplies. Cholesky: each pair damped by its π
    (factored Tikhonov); eigen: A⊗G + λI exactly.
    """
    size = len(grad_flat)
    system = np.zeros((size, size))
    for (a, g), index in zip(pairs, indices, strict=True):
        if method == CHOLESKY:
            pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
            root = np.sqrt(damping)
            block = np.kron(a + pi * root * np.eye(len(a)), g + root / pi * np.eye(len(g)))
        else:
            block = np.kron(a, g) + damping * np.eye(len(a) * len(g))
        system[np.ix_(index, index)] = block
    covered = np.concatenate(indices)
    assert sorted(covered) == list(range(size))  # every parameter in exactly one pair
    return np.linalg.solve(system, grad_flat)


def preconditioned(block, factors, grads, method):
    """The block's update of `grads` from `factors`, its payloads from `Block.invert`."""
    payloads = [block.invert(i, factors, DAMPING, method)[0] for i in range(len(factors))]
    update = block.precondition(
        [tf.constant(g) for g in grads], payloads, tf.constant(DAMPING, tf.float64), method
    )
    for u, g in zip(update, grads, strict=True):
        assert tuple(u.shape) == g.shape
    return np.concatenate([u.numpy().ravel() for u in update])


def record_case(block, x, seed):
    """Records the layer's call on x and draws output gradients (C, *s.shape)."""
    layer = block.layer
    try:
        output, record = block.record(layer.call, tf.constant(x))
    except tf.errors.UnimplementedError:
        if layer.data_format != "channels_first":
            raise
        pytest.skip("this CPU's TensorFlow cannot run this layer channels first")
    s = record.outputs.numpy()
    activated = layer.activation(tf.constant(s)).numpy()
    np.testing.assert_allclose(output.numpy(), activated, rtol=1e-12)
    grads = np.random.default_rng(seed + 100).normal(size=(C, *s.shape))
    return record, s, grads


def per_example_autodiff(layer, x, grads):
    """Each (column, example)'s gradient of ⟨g, s⟩ w.r.t. the layer's variables, flattened."""
    rows = []
    activation = layer.activation
    layer.activation = None
    try:
        for c in range(grads.shape[0]):
            for i in range(x.shape[0]):
                with tf.GradientTape() as tape:
                    s = layer(tf.constant(x[i : i + 1]))
                    pseudo = tf.reduce_sum(tf.constant(grads[c, i : i + 1]) * s)
                parts = tape.gradient(pseudo, layer.trainable_variables)
                rows.append(np.concatenate([p.numpy().ravel() for p in parts]))
    finally:
        layer.activation = activation
    return np.array(rows)


# --- the depthwise block ----------------------------------------------------------

DEPTHWISE_2D = {
    "valid": dict(kernel_size=3, depth_multiplier=2),
    "same_strided_asymmetric": dict(kernel_size=(3, 2), strides=2, padding="same"),
    "dilated_no_bias": dict(kernel_size=2, dilation_rate=2, depth_multiplier=3, use_bias=False),
    "channels_first": dict(kernel_size=2, depth_multiplier=2, data_format="channels_first"),
}
DEPTHWISE_1D = {
    "valid": dict(kernel_size=3, depth_multiplier=2),
    "same_strided_no_bias": dict(kernel_size=3, strides=2, padding="same", use_bias=False),
}
CASES = [(keras.layers.DepthwiseConv2D, n, c) for n, c in DEPTHWISE_2D.items()] + [
    (keras.layers.DepthwiseConv1D, n, c) for n, c in DEPTHWISE_1D.items()
]
IDS = [f"{cls.__name__}-{name}" for cls, name, _ in CASES]
CHANNELS = 3


def _build(cls, config, seed=0, approx=None):
    rng = np.random.default_rng(seed)
    layer = cls(activation="tanh", **config)
    spatial = (6, 5) if cls is keras.layers.DepthwiseConv2D else (9,)
    x = rng.normal(size=(B, *spatial, CHANNELS))
    if config.get("data_format") == "channels_first":
        x = np.moveaxis(x, -1, 1)
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape))
    if layer.bias is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape))
    return DepthwiseConvBlock(layer, approx), x


def depthwise_case(cls, config, seed=0, approx=None):
    """The block, its record, the output gradients, and NumPy's patches (b, T, k, C)."""
    block, x = _build(cls, config, seed, approx)
    record, s, grads = record_case(block, x, seed)
    layer = block.layer
    patches = layer_patches(layer, x)
    # The patch rows reproduce the layer's own output exactly:
    # s[·, c·M + m] = Σ_k P[·, k, c] W[k, c, m] + b[c·M + m].
    kernel = layer.kernel.numpy().reshape(patches.shape[2], CHANNELS, -1)
    want = np.einsum("btkc,kcm->btcm", patches, kernel).reshape(B, patches.shape[1], -1)
    if layer.bias is not None:
        want = want + layer.bias.numpy()
    got = channels_last(s, layer).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    return block, record, grads, patches


def depthwise_pairs(block, patches, grads):
    """NumPy's (A_c, G_c) of every channel."""
    layer = block.layer
    multiplier = layer.depth_multiplier
    outputs = channels_last(grads, layer, column_axis=True).reshape(C, B, -1, CHANNELS, multiplier)
    pairs = []
    for c in range(CHANNELS):
        inputs = patches[:, :, :, c]
        if layer.bias is not None:
            inputs = with_ones(inputs)
        pairs.append(kron_moments(inputs, outputs[..., c, :], B))
    return pairs


def depthwise_indices(block):
    """Each channel's parameters in the flat [kernel (k, C, M); bias (C·M)] vector, row-major."""
    layer = block.layer
    k, m = int(np.prod(layer.kernel_size)), layer.depth_multiplier
    kernel = np.arange(k * CHANNELS * m).reshape(k, CHANNELS, m)
    bias = k * CHANNELS * m + np.arange(CHANNELS * m).reshape(CHANNELS, m)
    indices = []
    for c in range(CHANNELS):
        rows = [kernel[:, c]] + ([bias[c][None]] if layer.bias is not None else [])
        indices.append(np.concatenate(rows).ravel())
    return indices


@pytest.mark.parametrize("cls, name, config", CASES, ids=IDS)
def test_factors_are_each_channels_patch_and_output_moments(float64, cls, name, config):
    block, record, grads, patches = depthwise_case(cls, config)
    a, g = block.statistics([record], [tf.constant(grads)], B)
    k = patches.shape[2] + int(block.layer.bias is not None)
    multiplier = block.layer.depth_multiplier
    assert block.factor_shapes() == [(CHANNELS, k, k), (CHANNELS, multiplier, multiplier)]
    assert block.group_counts() == [CHANNELS, CHANNELS]
    assert [tuple(a.shape), tuple(g.shape)] == block.factor_shapes()
    for c, (want_a, want_g) in enumerate(depthwise_pairs(block, patches, grads)):
        np.testing.assert_allclose(a.numpy()[c], want_a, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g.numpy()[c], want_g, rtol=1e-10, atol=1e-12)


def test_a_960_channel_layer_is_two_factors_and_two_units(float64):
    layer = keras.layers.DepthwiseConv2D(3, padding="same")
    layer.build((None, 7, 7, 960))
    block = DepthwiseConvBlock(layer)
    assert block.factor_names() == ["A", "G"]
    assert block.factor_shapes() == [(960, 10, 10), (960, 1, 1)]
    assert block.payload_shapes(EIGEN) == [[(960, 10), (960, 10, 10)], [(960, 1), (960, 1, 1)]]
    assert block.payload_shapes(CHOLESKY) == [[(960, 10, 10)], [(960, 1, 1)]]
    units = inversion_units([block])
    assert [(u.name, u.dim, u.kind, u.groups) for u in units] == [
        (f"{layer.name}/A", 10, "matrix", 960),
        (f"{layer.name}/G", 1, "matrix", 960),
    ]
    assert units[0].result_floats(CHOLESKY) == 960 * 55
    assert kfac.placement.FlopCostModel()(units[0]) == 960 * 10**3


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize(
    "cls, name, config",
    [CASES[0], CASES[2], CASES[3], CASES[5]],
    ids=[IDS[0], IDS[2], IDS[3], IDS[5]],
)
def test_update_is_numpys_block_diagonal_solve(float64, cls, name, config, method):
    block, record, grads, patches = depthwise_case(cls, config)
    factors = block.statistics([record], [tf.constant(grads)], B)
    rng = np.random.default_rng(5)
    grad_vars = [rng.normal(size=v.shape) for v in block.variables]
    flat = np.concatenate([g.ravel() for g in grad_vars])
    want = block_diagonal_update(
        depthwise_pairs(block, patches, grads), depthwise_indices(block), flat, method
    )
    got = preconditioned(block, factors, grad_vars, method)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_diagonal_and_full_statistics_are_autodiffs_per_example_gradients(float64, approx):
    cls, _, config = CASES[1]
    block, record, grads, _ = depthwise_case(cls, config, approx=approx)
    (stat,) = block.statistics([record], [tf.constant(grads)], B)
    layer = block.layer
    per_example = per_example_autodiff(layer, record.inputs.numpy(), grads)
    full = per_example.T @ per_example / B
    # Diagonal: the signed-gradient estimate, each column's batch gradient squared.
    signed = per_example.reshape(grads.shape[0], B, -1).sum(axis=1)
    want = (signed**2).sum(axis=0) / B if approx == DIAGONAL else full
    np.testing.assert_allclose(stat.numpy(), want, rtol=1e-9, atol=1e-12)


def exact_kfac(model, method=EIGEN, damping=1e-10):
    return kfac.Kfac(
        learning_rate=1.0,
        damping=damping,
        momentum=0.0,
        model=model,
        loss="mse",
        estimation_mode="exact",
        inverse_method=method,
        cov_ema_decay=0.0,
        invert_every=1,
    )


def test_one_exact_step_reaches_each_channels_least_squares(float64):
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    layer = keras.layers.DepthwiseConv2D(2, depth_multiplier=2, padding="same")
    model = keras.Sequential([keras.Input((4, 5, CHANNELS)), layer])
    x = rng.normal(size=(24, 4, 5, CHANNELS))
    y = rng.normal(size=(24, 4, 5, 2 * CHANNELS))
    model.compile(optimizer=exact_kfac(model), loss="mse")
    model.fit(x, y, batch_size=24, epochs=1, verbose=0, shuffle=False)
    patches = layer_patches(layer, x)
    targets = y.reshape(24, -1, CHANNELS, 2)
    kernel = layer.kernel.numpy().reshape(-1, CHANNELS, 2)
    bias = layer.bias.numpy().reshape(CHANNELS, 2)
    for c in range(CHANNELS):
        design = with_ones(patches[:, :, :, c]).reshape(-1, patches.shape[2] + 1)
        solution = np.linalg.lstsq(design, targets[:, :, c].reshape(-1, 2), rcond=None)[0]
        got = np.concatenate([kernel[:, c], bias[c][None]])
        np.testing.assert_allclose(got, solution, rtol=1e-6, atol=1e-8)


def mobilenet_like():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, strides=2, padding="same"),
            keras.layers.DepthwiseConv2D(3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(12, 1),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )


def fit_losses(model, steps=5, **kfac_args):
    """Registers every layer structured (unsupported layers are an error), then takes
    `steps` steps; returns the optimizer and the training loss before each step and after."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, *model.input_shape[1:])).astype("float32")
    y = rng.integers(0, model.output_shape[-1], size=16)
    args = dict(
        learning_rate=0.05,
        damping=0.05,
        model=model,
        loss="sparse_categorical_crossentropy",
        unsupported_layers="error",
    )
    args.update(kfac_args)
    opt = kfac.Kfac(**args)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    # train_on_batch returns the loss before its step: the last call's is the
    # loss after `steps` steps (in training mode, BatchNorm on batch statistics).
    losses = [float(model.train_on_batch(x, y)) for _ in range(steps + 1)]
    return opt, losses


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_mobilenet_like_model_registers_structured_and_trains(method):
    model = mobilenet_like()
    opt, losses = fit_losses(model, inverse_method=method)
    blocks = opt.curvature.blocks
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    covered = {id(v) for b in blocks for v in b.variables}
    assert covered == {id(v) for v in model.trainable_variables}
    depthwise = [b for b in blocks if isinstance(b, DepthwiseConvBlock)]
    assert len(depthwise) == 1 and depthwise[0].approx == KRON
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
