"""ConvBlock (KFC) against a NumPy im2col: Ω over patches, Γ over output
locations, per-example statistics, the 1×1-convolution = Dense identity, and
one exact step reaching least squares over the patches."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist.blocks import CHOLESKY, DIAGONAL, EIGEN, FULL, ConvBlock, DenseBlock

B, C = 3, 2
DAMPING = 0.05


def _im2col(x, kernel_size, strides, dilation, padding):
    """(b, OH, OW, kh·kw·channels) patches of a channels-last image, zero padded.

    'same' pads as TensorFlow does: total = max((O-1)·s + (k-1)·d + 1 - H, 0),
    the smaller half before.
    """
    b, height, width, channels = x.shape
    sizes = (height, width)
    out, before = [], []
    for size, k, s, d in zip(sizes, kernel_size, strides, dilation, strict=True):
        span = (k - 1) * d + 1
        if padding == "valid":
            o = (size - span) // s + 1
            out.append(o)
            before.append(0)
        else:
            o = -(-size // s)
            out.append(o)
            before.append(max((o - 1) * s + span - size, 0) // 2)
    kh, kw = kernel_size
    patches = np.zeros((b, out[0], out[1], kh, kw, channels))
    for i in range(out[0]):
        for j in range(out[1]):
            for p in range(kh):
                for q in range(kw):
                    r = i * strides[0] - before[0] + p * dilation[0]
                    c = j * strides[1] - before[1] + q * dilation[1]
                    if 0 <= r < height and 0 <= c < width:
                        patches[:, i, j, p, q] = x[:, r, c]
    return patches.reshape(b, out[0], out[1], kh * kw * channels)


def _im2col_1d(x, kernel, stride, dilation, padding):
    """Conv1D patches (b, OL, k·channels); 'causal' pads (k-1)·d zeros on the left."""
    if padding == "causal":
        x = np.pad(x, [(0, 0), ((kernel - 1) * dilation, 0), (0, 0)])
        padding = "valid"
    patches = _im2col(x[:, None], (1, kernel), (1, stride), (1, dilation), padding)
    return patches[:, 0]


def _im2col_nd(x, kernel_size, strides, dilation, padding):
    """(b, *O, prod(kernel)·channels) patches of a channels-last input, any rank.

    Same padding rule as `_im2col`; kernel entries row-major, then channel.
    """
    b, *sizes, channels = x.shape
    out, before = [], []
    for size, k, s, d in zip(sizes, kernel_size, strides, dilation, strict=True):
        span = (k - 1) * d + 1
        o = (size - span) // s + 1 if padding == "valid" else -(-size // s)
        out.append(o)
        before.append(0 if padding == "valid" else max((o - 1) * s + span - size, 0) // 2)
    patches = np.zeros((b, *out, *kernel_size, channels))
    for position in itertools.product(*(range(o) for o in out)):
        for entry in itertools.product(*(range(k) for k in kernel_size)):
            source = tuple(
                o * s - p + k * d
                for o, s, p, k, d in zip(position, strides, before, entry, dilation)
            )
            if all(0 <= i < size for i, size in zip(source, sizes)):
                patches[(slice(None), *position, *entry)] = x[(slice(None), *source)]
    return patches.reshape(b, *out, -1)


CONV2D_CASES = {
    "valid": dict(filters=3, kernel_size=3),
    "same_strided_asymmetric": dict(filters=2, kernel_size=(3, 2), strides=(2, 1), padding="same"),
    "valid_strided_no_bias": dict(filters=2, kernel_size=3, strides=2, use_bias=False),
    "same_dilated": dict(filters=2, kernel_size=3, dilation_rate=2, padding="same"),
    "valid_dilated_no_bias": dict(filters=3, kernel_size=2, dilation_rate=(2, 1), use_bias=False),
    "channels_first_same": dict(
        filters=2, kernel_size=2, padding="same", data_format="channels_first"
    ),
}
CONV1D_CASES = {
    "causal_dilated": dict(filters=3, kernel_size=3, dilation_rate=2, padding="causal"),
    "causal_no_bias": dict(filters=2, kernel_size=2, padding="causal", use_bias=False),
    "same_strided": dict(filters=2, kernel_size=3, strides=2, padding="same"),
    "valid": dict(filters=2, kernel_size=2),
}
CONV3D_CASES = {
    "valid": dict(filters=2, kernel_size=2),
    "same_strided_asymmetric": dict(
        filters=2, kernel_size=(3, 2, 2), strides=(2, 1, 2), padding="same"
    ),
    # Dilated: tf.extract_volume_patches has no rates, the strided slices stand in.
    "same_dilated": dict(filters=2, kernel_size=2, dilation_rate=2, padding="same"),
    "valid_dilated_no_bias": dict(
        filters=3, kernel_size=2, dilation_rate=(2, 1, 2), use_bias=False
    ),
    "channels_first_same": dict(
        filters=2, kernel_size=2, padding="same", data_format="channels_first"
    ),
}
IMAGE = (6, 7, 2)  # H, W, channels (channels last)
SEQUENCE = (9, 2)  # L, channels
VOLUME = (4, 5, 3, 2)  # D, H, W, channels
SHAPES = {keras.layers.Conv1D: SEQUENCE, keras.layers.Conv2D: IMAGE, keras.layers.Conv3D: VOLUME}


def _build(cls, config, seed):
    rng = np.random.default_rng(seed)
    layer = cls(activation="relu", **config)
    channels_first = config.get("data_format") == "channels_first"
    shape = SHAPES[cls]
    x = rng.normal(size=(B, *shape)).astype(np.float32)
    if channels_first:
        x = np.moveaxis(x, -1, 1)
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    if layer.bias is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))
    return layer, x


def _reference_patches(layer, x):
    """NumPy patches (b, positions, fan_in) with the bias column, channels last."""
    if isinstance(layer, keras.layers.Conv1D):
        patches = _im2col_1d(
            x,
            layer.kernel_size[0],
            layer.strides[0],
            layer.dilation_rate[0],
            layer.padding,
        )
    else:
        if layer.data_format == "channels_first":
            x = np.moveaxis(x, 1, -1)
        im2col = _im2col_nd if isinstance(layer, keras.layers.Conv3D) else _im2col
        patches = im2col(x, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)
    patches = patches.reshape(B, -1, patches.shape[-1])
    if layer.bias is not None:
        patches = np.concatenate([patches, np.ones(patches.shape[:-1] + (1,))], -1)
    return patches


def _channels_last_call(layer):
    """The layer's call on channels-first data, computed channels last.

    Without oneDNN (CPUs without AVX-512, or TF_ENABLE_ONEDNN_OPTS=0)
    TensorFlow's CPU Conv2D runs only NHWC; the block under test still sees
    channels-first inputs and outputs.
    """
    rank = len(layer.kernel_size) + 2
    to_last, to_first = [0, *range(2, rank), 1], [0, rank - 1, *range(1, rank - 1)]

    def call(x):
        s = tf.nn.convolution(
            tf.transpose(x, to_last),
            layer.kernel,
            strides=layer.strides,
            padding=layer.padding.upper(),
            dilations=layer.dilation_rate,
        )
        if layer.bias is not None:
            s = s + layer.bias
        s = tf.transpose(s, to_first)
        return s if layer.activation is None else layer.activation(s)

    return call


def _call(layer):
    return _channels_last_call(layer) if layer.data_format == "channels_first" else layer.call


def _layer_case(cls, cases, name, approx=None, seed=0):
    layer, x = _build(cls, cases[name], seed)
    block = ConvBlock(layer, approx)
    output, record = block.record(_call(layer), tf.constant(x))
    patches = _reference_patches(layer, x.astype(np.float64))
    s = record.outputs.numpy()
    # The reference im2col reproduces the layer's own convolution.
    kernel = layer.kernel.numpy().reshape(-1, layer.filters)
    if layer.bias is not None:
        kernel = np.concatenate([kernel, layer.bias.numpy()[None]], axis=0)
    s_last = np.moveaxis(s, 1, -1) if layer.data_format == "channels_first" else s
    np.testing.assert_allclose(
        (patches @ kernel).reshape(s_last.shape), s_last, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(output.numpy(), np.maximum(s, 0), rtol=1e-6)
    rng = np.random.default_rng(seed + 100)
    grads = rng.normal(size=(C, *s.shape))
    channels_first = layer.data_format == "channels_first"
    grads_last = np.moveaxis(grads, 2, -1) if channels_first else grads
    grads_rows = grads_last.reshape(C, B, -1, layer.filters)
    return block, record, tf.constant(grads, tf.float32), patches, grads_rows


ALL_CASES = (
    [(keras.layers.Conv2D, CONV2D_CASES, n) for n in CONV2D_CASES]
    + [(keras.layers.Conv1D, CONV1D_CASES, n) for n in CONV1D_CASES]
    + [(keras.layers.Conv3D, CONV3D_CASES, n) for n in CONV3D_CASES]
)
IDS = [f"{cls.__name__}-{name}" for cls, _, name in ALL_CASES]


@pytest.mark.parametrize(
    "cls, cases", [(keras.layers.Conv2D, CONV2D_CASES), (keras.layers.Conv3D, CONV3D_CASES)]
)
def test_channels_last_stand_in_computes_the_channels_first_layer(cls, cases):
    layer, x = _build(cls, cases["channels_first_same"], seed=0)
    want = _channels_last_call(layer)(tf.constant(x)).numpy()
    try:
        got = layer(x).numpy()
    except tf.errors.UnimplementedError:
        pytest.skip(
            f"TensorFlow cannot run {cls.__name__}(data_format='channels_first') on this CPU "
            "(oneDNN off: no AVX-512, or TF_ENABLE_ONEDNN_OPTS=0); the other tests "
            "use the channels-last stand-in checked here where it can run"
        )
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, cases, name", ALL_CASES, ids=IDS)
def test_kron_factors_are_patch_and_location_averaged_moments(cls, cases, name):
    block, record, grads, patches, grads_rows = _layer_case(cls, cases, name)
    omega, gamma = block.statistics([record], [grads], B)
    positions = patches.shape[1]
    rows = patches.reshape(-1, patches.shape[-1])
    expected_omega = rows.T @ rows / B
    expected_gamma = sum(
        grads_rows[c].reshape(-1, grads_rows.shape[-1]).T
        @ grads_rows[c].reshape(-1, grads_rows.shape[-1])
        for c in range(C)
    ) / (B * positions)
    assert [tuple(omega.shape), tuple(gamma.shape)] == block.factor_shapes()
    np.testing.assert_allclose(omega.numpy(), expected_omega, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gamma.numpy(), expected_gamma, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cls, cases, name",
    [
        (keras.layers.Conv2D, CONV2D_CASES, "same_strided_asymmetric"),
        (keras.layers.Conv2D, CONV2D_CASES, "channels_first_same"),
        (keras.layers.Conv1D, CONV1D_CASES, "causal_dilated"),
        (keras.layers.Conv3D, CONV3D_CASES, "same_dilated"),
    ],
)
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_diagonal_and_full_statistics_sum_patch_gradients(cls, cases, name, approx):
    block, record, grads, patches, grads_rows = _layer_case(cls, cases, name, approx)
    try:
        (stat,) = block.statistics([record], [grads], B)
    except tf.errors.UnimplementedError:
        # The diagonal estimate runs the layer's own convolution.
        pytest.skip(
            f"TensorFlow cannot run {cls.__name__}(data_format='channels_first') on this CPU "
            "(oneDNN off); the NumPy check of the statistic runs where the op can"
        )
    # ĝ[c, i] = Σ_t ā_t g_tᵀ, flattened (kernel rows in (row, col, channel) order,
    # then the bias row), as the variables are flattened.
    per_example = np.einsum("bti,cbto->cbio", patches, grads_rows).reshape(C * B, -1)
    if approx == DIAGONAL:
        # The signed-gradient estimate: each column's batch gradient squared
        # (unbiased for Σ ĝ²/b under the pseudo-loss's random signs).
        expected = np.sum(per_example.reshape(C, B, -1).sum(axis=1) ** 2, axis=0) / B
    else:
        expected = per_example.T @ per_example / B
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_conv_per_example_gradient_order_matches_kernel_autodiff():
    """The flattened kernel-then-bias layout is the gradient of ⟨g, s⟩ per example."""
    block, record, grads, patches, grads_rows = _layer_case(
        keras.layers.Conv2D, CONV2D_CASES, "same_strided_asymmetric", DIAGONAL
    )
    layer = block.layer
    per_example = np.einsum("bti,cbto->cbio", patches, grads_rows)
    x = record.inputs
    for i in range(B):
        with tf.GradientTape() as tape:
            s = layer.convolution_op(x[i : i + 1], layer.kernel) + layer.bias
            pseudo = tf.reduce_sum(grads[0, i : i + 1] * s)
        kernel, bias = tape.gradient(pseudo, [layer.kernel, layer.bias])
        flat = np.concatenate([kernel.numpy().ravel(), bias.numpy()])
        np.testing.assert_allclose(flat, per_example[0, i].ravel(), rtol=1e-4, atol=1e-4)


# --- 1×1 convolution over a 1×1 image is a Dense layer -----------------------


@pytest.fixture(scope="module")
def pointwise():
    rng = np.random.default_rng(11)
    d_in, d_out = 4, 3
    conv = keras.layers.Conv2D(d_out, 1)
    conv.build((None, 1, 1, d_in))
    dense = keras.layers.Dense(d_out)
    dense.build((None, d_in))
    kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
    bias = rng.normal(size=(d_out,)).astype(np.float32)
    conv.set_weights([kernel.reshape(1, 1, d_in, d_out), bias])
    dense.set_weights([kernel, bias])
    conv_block, dense_block = ConvBlock(conv), DenseBlock(dense)
    x = rng.normal(size=(B, d_in)).astype(np.float32)
    g = rng.normal(size=(C, B, d_out)).astype(np.float32)
    conv_out, conv_record = conv_block.record(conv.call, tf.constant(x[:, None, None]))
    dense_out, dense_record = dense_block.record(dense.call, tf.constant(x))
    np.testing.assert_allclose(conv_out.numpy()[:, 0, 0], dense_out.numpy(), rtol=1e-6, atol=1e-6)
    conv_factors = conv_block.statistics([conv_record], [tf.constant(g[:, :, None, None])], B)
    dense_factors = dense_block.statistics([dense_record], [tf.constant(g)], B)
    grad = rng.normal(size=(d_in + 1, d_out)).astype(np.float32)
    return dict(
        blocks=(conv_block, dense_block),
        factors=(conv_factors, dense_factors),
        x=x.astype(np.float64),
        g=g.astype(np.float64),
        grad=grad,
    )


def test_pointwise_conv_on_one_pixel_gives_dense_factors(pointwise):
    conv_factors, dense_factors = pointwise["factors"]
    a_bar = np.concatenate([pointwise["x"], np.ones((B, 1))], axis=1)
    g = pointwise["g"]
    expected = [a_bar.T @ a_bar / B, sum(g[c].T @ g[c] for c in range(C)) / B]
    for conv_f, dense_f, ref in zip(conv_factors, dense_factors, expected, strict=True):
        np.testing.assert_allclose(conv_f.numpy(), dense_f.numpy(), rtol=1e-6)
        np.testing.assert_allclose(conv_f.numpy(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_pointwise_conv_on_one_pixel_gives_dense_update(pointwise, method):
    conv_block, dense_block = pointwise["blocks"]
    grad = pointwise["grad"]
    d_in, d_out = grad.shape[0] - 1, grad.shape[1]
    updates = []
    for block, factors, kernel_shape in zip(
        (conv_block, dense_block),
        pointwise["factors"],
        ((1, 1, d_in, d_out), (d_in, d_out)),
        strict=True,
    ):
        payloads = [block.invert(i, factors, DAMPING, method)[0] for i in range(2)]
        kernel, bias = block.precondition(
            [tf.constant(grad[:-1].reshape(kernel_shape)), tf.constant(grad[-1])],
            payloads,
            DAMPING,
            method,
        )
        assert kernel.shape == kernel_shape
        updates.append(np.concatenate([kernel.numpy().reshape(d_in, d_out), bias.numpy()[None]]))
    np.testing.assert_allclose(updates[0], updates[1], rtol=1e-5, atol=1e-6)

    a, g = (f.numpy().astype(np.float64) for f in pointwise["factors"][1])
    if method == CHOLESKY:
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        root = np.sqrt(DAMPING)
        expected = (
            np.linalg.inv(a + pi * root * np.eye(len(a)))
            @ grad
            @ np.linalg.inv(g + root / pi * np.eye(len(g)))
        )
    else:
        system = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
        expected = np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)
    np.testing.assert_allclose(updates[0], expected, rtol=1e-3, atol=1e-4)


def test_grouped_convolution_is_rejected():
    layer = keras.layers.Conv2D(4, 3, groups=2)
    layer.build((None, 5, 5, 4))
    with pytest.raises(ValueError, match="grouped convolution"):
        ConvBlock(layer)


# --- one exact step on a linear convolution reaches least squares ----------

EXACT_STEP_CASES = {
    "Conv2D-same_strided": (keras.layers.Conv2D, (4, 4, 1), dict(kernel_size=3, strides=2)),
    "Conv3D-same_dilated": (
        keras.layers.Conv3D,
        (3, 3, 2, 1),
        dict(kernel_size=2, dilation_rate=2),
    ),
}


@pytest.mark.parametrize("name", list(EXACT_STEP_CASES))
def test_one_exact_step_on_a_linear_conv_reaches_least_squares(float64, name):
    """MSE on per-position targets: the Fisher is Σ_t ā āᵀ ⊗ I, so KFC is exact.

    One step at learning rate 1 with a tiny eigen damping is then Newton's:
    the kernel and bias solve least squares of the targets on the patches.
    """
    cls, shape, config = EXACT_STEP_CASES[name]
    keras.utils.set_random_seed(3)
    layer = cls(2, padding="same", **config)
    model = keras.Sequential([keras.Input(shape), layer])
    rng = np.random.default_rng(4)
    b = 6
    x = rng.normal(size=(b, *shape))
    out_shape = model.compute_output_shape((b, *shape))[1:]
    y = rng.normal(size=(b, *out_shape))
    opt = kfac.Kfac(
        learning_rate=1.0,
        damping=1e-10,
        momentum=0.0,
        model=model,
        loss="mse",
        estimation_mode="exact",
        inverse_method="eigen",
        cov_ema_decay=0.0,
        invert_every=1,
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=b, epochs=1, verbose=0, shuffle=False)

    im2col = _im2col_nd if cls is keras.layers.Conv3D else _im2col
    patches = im2col(x, layer.kernel_size, layer.strides, layer.dilation_rate, "same")
    design = patches.reshape(-1, patches.shape[-1])
    design = np.concatenate([design, np.ones((len(design), 1))], axis=1)
    assert np.linalg.matrix_rank(design) == design.shape[1]
    solution = np.linalg.lstsq(design, y.reshape(-1, 2), rcond=None)[0]
    got = np.concatenate([layer.kernel.numpy().reshape(-1, 2), layer.bias.numpy()[None]])
    np.testing.assert_allclose(got, solution, rtol=1e-6, atol=1e-6 * np.abs(solution).max())
