"""ConvTransposeBlock (KFC) against NumPy: the patches of the adjoint convolution and the
layer's own output, factors, per-example statistics and preconditioned updates in Keras'
kernel layout, one exact step to least squares, and a decoder trained with K-FAC.

The NumPy reference is the definition: output o reads input i through kernel
entry k where o = i·s + k·d - crop, with crop = span - 1 - left and `left`
the padding Keras' JAX path puts before the stride-dilated input. The block
derives its padding from TensorFlow's rule instead; the layer checks both.
"""

import itertools
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import registration
from kfac_dist.blocks import (
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    ConvBlock,
    ConvTransposeBlock,
    DenseBlock,
    Record,
)

B, C = 3, 2
DAMPING = 0.05
CONV1DT, CONV2DT, CONV3DT = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
SHAPES = {CONV1DT: (4, 2), CONV2DT: (3, 4, 2), CONV3DT: (2, 3, 2, 2)}  # channels last


def _grid():
    """Conv2DTranspose over strides, kernel, padding, output_padding and dilation.

    Keras refuses output_padding ≥ strides and strides > 1 with dilation > 1.
    """
    cases = {}
    for s, k, padding, op, d in itertools.product(
        (1, 2), (2, 3), ("valid", "same"), (None, 1), (1, 2)
    ):
        if (op is not None and op >= s) or (s > 1 and d > 1):
            continue
        config = dict(kernel_size=k, strides=s, padding=padding, output_padding=op, dilation_rate=d)
        cases[f"2d-s{s}-k{k}-{padding}-op{op}-d{d}"] = (CONV2DT, config)
    return cases


CASES = {
    **_grid(),
    "2d-asymmetric": (
        CONV2DT,
        dict(kernel_size=(2, 3), strides=(2, 1), padding="same", output_padding=(1, 0)),
    ),
    "2d-stride_over_kernel": (CONV2DT, dict(kernel_size=2, strides=3)),
    "2d-valid_op1_no_bias": (
        CONV2DT,
        dict(kernel_size=3, strides=2, output_padding=1, use_bias=False),
    ),
    "1d-same_op1": (CONV1DT, dict(kernel_size=3, strides=2, padding="same", output_padding=1)),
    "1d-valid_dilated_no_bias": (CONV1DT, dict(kernel_size=3, dilation_rate=2, use_bias=False)),
    "1d-stride_over_kernel": (CONV1DT, dict(kernel_size=2, strides=3)),
    "3d-same_strided": (CONV3DT, dict(kernel_size=2, strides=2, padding="same")),
    "3d-valid_dilated": (CONV3DT, dict(kernel_size=2, dilation_rate=(2, 1, 2))),
    "3d-asymmetric": (
        CONV3DT,
        dict(kernel_size=(2, 3, 2), strides=(1, 2, 2), output_padding=(0, 1, 1)),
    ),
    "1d-channels_first": (
        CONV1DT,
        dict(kernel_size=3, strides=2, padding="same", data_format="channels_first"),
    ),
    "2d-channels_first": (
        CONV2DT,
        dict(kernel_size=3, strides=2, padding="same", data_format="channels_first"),
    ),
    "3d-channels_first": (
        CONV3DT,
        dict(kernel_size=2, strides=2, output_padding=1, data_format="channels_first"),
    ),
}
CHANNELS_FIRST = [name for name in CASES if name.endswith("channels_first")]
# What the CPU kernels of TensorFlow lack without oneDNN (TF_ENABLE_ONEDNN_OPTS=0,
# CPUs without AVX-512) or in float64: dilated and channels-first transposed convolutions.
_UNAVAILABLE = re.compile(r"not yet support dilation rates larger than 1|only supports N\w+")


def _build(name, seed=0):
    cls, config = CASES[name]
    rng = np.random.default_rng(seed)
    layer = cls(filters=3 if "no_bias" in name else 2, activation="relu", **config)
    x = rng.normal(size=(B, *SHAPES[cls])).astype(np.float32)
    if layer.data_format == "channels_first":
        x = np.moveaxis(x, -1, 1)
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape).astype(np.float32))
    if layer.bias is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype(np.float32))
    return layer, x


def _last(layer, x):
    return np.moveaxis(x, 1, -1) if layer.data_format == "channels_first" else x


def _left_pad(k, s, d, padding, output_padding):
    """The padding before the stride-dilated input in Keras' JAX path."""
    span = (k - 1) * d + 1
    if padding == "valid":
        return span - 1
    if output_padding is None:
        pad = s + span - 2
    else:
        pad = span + span % 2 - 2 + output_padding
    return min(pad // 2 + pad % 2, span - 1)


def _reference_patches(layer, x):
    """(b, *O, *kernel, channels): the input each output reads through each kernel entry."""
    out = layer.compute_output_shape(x.shape)
    out = list(out[1:-1]) if layer.data_format == "channels_last" else list(out[2:])
    x = _last(layer, x.astype(np.float64))
    b, *sizes, channels = x.shape
    rank = len(sizes)
    output_padding = layer.output_padding or (None,) * rank
    crops = [
        (k - 1) * d - _left_pad(k, s, d, layer.padding, op)
        for k, s, d, op in zip(
            layer.kernel_size, layer.strides, layer.dilation_rate, output_padding
        )
    ]
    patches = np.zeros((b, *out, *layer.kernel_size, channels))
    for source in itertools.product(*(range(n) for n in sizes)):
        for entry in itertools.product(*(range(k) for k in layer.kernel_size)):
            target = tuple(
                i * s + k * d - crop
                for i, k, s, d, crop in zip(
                    source, entry, layer.strides, layer.dilation_rate, crops
                )
            )
            if all(0 <= o < n for o, n in zip(target, out)):
                patches[(slice(None), *target, *entry)] = x[(slice(None), *source)]
    return patches


def _with_ones(rows):
    return np.concatenate([rows, np.ones(rows.shape[:-1] + (1,))], axis=-1)


def _block_rows(layer, reference):
    """The reference in the block's layout (kernel entries flipped), (b, T, fan_in)."""
    rank = len(layer.kernel_size)
    flipped = np.flip(reference, axis=tuple(range(1 + rank, 1 + 2 * rank)))
    rows = flipped.reshape(B, -1, int(np.prod(layer.kernel_size)) * reference.shape[-1])
    return _with_ones(rows) if layer.bias is not None else rows


def _reference_matrix(layer, kernel, bias):
    """[kernel; bias] as the (kernel·in_channels + 1, filters) matrix of the reference patches."""
    matrix = np.swapaxes(kernel, -1, -2).reshape(-1, kernel.shape[-2])
    return matrix if bias is None else np.concatenate([matrix, bias[None]], axis=0)


def _numpy_gradient_matrix(kernel, bias):
    """Keras' kernel (*k, filters, in) → the block's matrix: entries flipped, channels swapped."""
    rank = kernel.ndim - 2
    matrix = np.swapaxes(np.flip(kernel, axis=tuple(range(rank))), -1, -2)
    matrix = matrix.reshape(-1, kernel.shape[-2])
    return matrix if bias is None else np.concatenate([matrix, bias[None]], axis=0)


def _numpy_keras_layout(matrix, kernel_shape, has_bias):
    """Inverse of `_numpy_gradient_matrix`: [kernel (Keras shape), bias]."""
    *kernel_size, filters, channels = kernel_shape
    rank = len(kernel_size)
    kernel_rows = matrix[: int(np.prod(kernel_size)) * channels]
    kernel = kernel_rows.reshape(*kernel_size, channels, filters)
    kernel = np.flip(np.swapaxes(kernel, -1, -2), axis=tuple(range(rank)))
    return [kernel, matrix[-1]] if has_bias else [kernel]


def _stand_in(layer):
    """The layer's call on channels-first data, computed channels last (see test_conv.py)."""
    rank = len(layer.kernel_size) + 2
    to_last, to_first = [0, *range(2, rank), 1], [0, rank - 1, *range(1, rank - 1)]

    def call(x):
        s = keras.ops.conv_transpose(
            tf.transpose(x, to_last),
            layer.kernel,
            strides=layer.strides,
            padding=layer.padding,
            output_padding=layer.output_padding,
            dilation_rate=layer.dilation_rate,
            data_format="channels_last",
        )
        if layer.bias is not None:
            s = s + layer.bias
        s = tf.transpose(s, to_first)
        return s if layer.activation is None else layer.activation(s)

    return call


def _call(layer):
    return _stand_in(layer) if layer.data_format == "channels_first" else layer.call


def _run_or_skip(fn, *args):
    try:
        return fn(*args)
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as error:
        if not _UNAVAILABLE.search(str(error)):
            raise
        pytest.skip(
            "TensorFlow's CPU transposed convolution cannot run this configuration here "
            f"(oneDNN off, or float64): '{_UNAVAILABLE.search(str(error)).group(0)}'; the "
            "NumPy checks of its patches, factors and updates still run"
        )


def _recorded(name, approx=None, seed=0, run_layer=False):
    """A record of the layer and random output gradients.

    With `run_layer` the block records the layer's own call (its
    pre-activation); otherwise the record holds the input and an output of
    the layer's shape, all the statistics read, so that configurations this
    CPU cannot run are still checked against NumPy.
    """
    layer, x = _build(name, seed)
    block = ConvTransposeBlock(layer, approx)
    if run_layer:
        output, record = _run_or_skip(block.record, _call(layer), tf.constant(x))
        np.testing.assert_allclose(output.numpy(), np.maximum(record.outputs.numpy(), 0), rtol=1e-6)
    else:
        record = Record(tf.constant(x), tf.zeros(layer.compute_output_shape(x.shape)))
    shape = tuple(record.outputs.shape)
    grads = np.random.default_rng(seed + 100).normal(size=(C, *shape))
    grads_last = np.moveaxis(grads, 2, -1) if layer.data_format == "channels_first" else grads
    grads_rows = grads_last.reshape(C, B, -1, layer.filters)
    return block, record, tf.constant(grads, tf.float32), x, grads_rows


# --- the patches ---------------------------------------------------------------


def test_transposed_cases_cover_the_configurations_the_brief_asks_for():
    grid = [config for cls, config in CASES.values() if cls is CONV2DT]
    seen = {
        (c.get("strides", 1), c.get("kernel_size"), c.get("padding", "valid"))
        for c in grid
        if isinstance(c.get("kernel_size"), int)
    }
    assert {(s, k, p) for s in (1, 2) for k in (2, 3) for p in ("valid", "same")} <= seen
    assert any(c.get("output_padding") == 1 for c in grid)
    assert any(c.get("dilation_rate") == 2 for c in grid)


@pytest.mark.parametrize("name", list(CASES))
def test_patches_are_the_inputs_each_kernel_entry_maps_to(name):
    """Independent of any TensorFlow op: the block's rows equal the definition's, exactly."""
    layer, x = _build(name)
    block = ConvTransposeBlock(layer)
    rows = block.input_rows(Record(tf.constant(x), tf.zeros([0])))
    expected = _block_rows(layer, _reference_patches(layer, x))
    np.testing.assert_array_equal(rows.numpy(), expected.reshape(-1, expected.shape[-1]))
    assert block.kron_dims() == ((expected.shape[-1],) * 2, layer.filters)


@pytest.mark.parametrize("name", list(CASES))
def test_patch_rows_times_kernel_matrix_give_the_layer_output(name):
    block, record, _, x, _ = _recorded(name, run_layer=True)
    layer = block.layer
    s = _last(layer, record.outputs.numpy()).reshape(B, -1, layer.filters)
    weights = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
    rows = block.input_rows(record)
    matrix = block.gradient_matrix([tf.cast(w, tf.float32) for w in weights])
    np.testing.assert_allclose(
        tf.matmul(rows, matrix).numpy().reshape(s.shape), s, rtol=1e-5, atol=1e-5
    )
    # ... and so does the definition, with Keras' kernel as it is (not flipped).
    reference = _reference_patches(layer, x).reshape(B, s.shape[1], -1)
    if layer.bias is not None:
        reference = _with_ones(reference)
    bias = layer.bias.numpy() if layer.bias is not None else None
    np.testing.assert_allclose(
        reference @ _reference_matrix(layer, layer.kernel.numpy(), bias), s, rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("name", CHANNELS_FIRST)
def test_channels_last_stand_in_computes_the_channels_first_layer(name):
    layer, x = _build(name)
    want = _stand_in(layer)(tf.constant(x)).numpy()
    got = _run_or_skip(layer, x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# --- the factors and the per-example statistics ---------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_kron_factors_are_patch_and_position_averaged_moments(name):
    block, record, grads, x, grads_rows = _recorded(name)
    a, g = block.statistics([record], [grads], B)
    rows = _block_rows(block.layer, _reference_patches(block.layer, x))
    positions = rows.shape[1]
    rows = rows.reshape(-1, rows.shape[-1])
    expected_g = sum(
        grads_rows[c].reshape(-1, block.layer.filters).T
        @ grads_rows[c].reshape(-1, block.layer.filters)
        for c in range(C)
    ) / (B * positions)
    assert [tuple(a.shape), tuple(g.shape)] == block.factor_shapes()
    np.testing.assert_allclose(a.numpy(), rows.T @ rows / B, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.numpy(), expected_g, rtol=1e-5, atol=1e-6)


def _per_example_keras_layout(layer, x, grads_rows):
    """ĝ[c, i] = Σ_t ā_t g_tᵀ from the definition's patches, flattened as Keras' variables."""
    reference = _reference_patches(layer, x)
    reference = reference.reshape(B, grads_rows.shape[2], -1)
    per_example = np.einsum("bti,cbto->cbio", reference, grads_rows)  # (C, B, k·in, filters)
    *kernel_size, filters, channels = layer.kernel.shape
    kernel = per_example.reshape(C, B, *kernel_size, channels, filters)
    parts = [np.swapaxes(kernel, -1, -2).reshape(C * B, -1)]
    if layer.bias is not None:
        parts.append(grads_rows.sum(axis=2).reshape(C * B, -1))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("name", ["2d-asymmetric", "1d-valid_dilated_no_bias", "3d-asymmetric"])
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_diagonal_and_full_statistics_are_in_the_variables_layout(name, approx):
    block, record, grads, x, grads_rows = _recorded(name, approx)
    # The diagonal estimate runs the layer's own transposed convolution.
    (stat,) = _run_or_skip(block.statistics, [record], [grads], B)
    per_example = _per_example_keras_layout(block.layer, x, grads_rows)
    if approx == DIAGONAL:
        # The signed-gradient estimate: each column's batch gradient squared.
        expected = np.sum(per_example.reshape(C, B, -1).sum(axis=1) ** 2, axis=0) / B
    else:
        expected = per_example.T @ per_example / B
    assert tuple(stat.shape) == block.factor_shapes()[0]
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_per_example_reference_is_the_autodiff_gradient_of_the_layer():
    """Anchors the reference above: ĝ[c, i] is the gradient of ⟨g[c, i], s_i⟩."""
    block, record, grads, x, grads_rows = _recorded("2d-asymmetric", run_layer=True)
    layer = block.layer
    expected = _per_example_keras_layout(layer, x, grads_rows).reshape(C, B, -1)
    for c, i in itertools.product(range(C), range(B)):
        with tf.GradientTape() as tape:
            s = keras.ops.conv_transpose(
                x[i : i + 1],
                layer.kernel,
                strides=layer.strides,
                padding=layer.padding,
                output_padding=layer.output_padding,
            )
            pseudo = tf.reduce_sum(grads[c, i : i + 1] * (s + layer.bias))
        kernel, bias = tape.gradient(pseudo, [layer.kernel, layer.bias])
        flat = np.concatenate([kernel.numpy().ravel(), bias.numpy()])
        np.testing.assert_allclose(flat, expected[c, i], rtol=1e-4, atol=1e-4)


# --- the gradient matrix and the preconditioned update --------------------------


@pytest.mark.parametrize(
    "name", ["1d-same_op1", "2d-asymmetric", "2d-valid_op1_no_bias", "3d-asymmetric"]
)
def test_gradient_matrix_maps_the_keras_kernel_exactly_and_back(name):
    layer, _ = _build(name)
    block = ConvTransposeBlock(layer)
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=v.shape) for v in block.variables]
    bias = grads[1] if len(grads) == 2 else None
    matrix = block.gradient_matrix([tf.constant(g) for g in grads])
    np.testing.assert_array_equal(matrix.numpy(), _numpy_gradient_matrix(grads[0], bias))
    assert tuple(matrix.shape) == (block.kron_dims()[0][0], block.kron_dims()[1])
    back = block.split_matrix(matrix)
    assert [tuple(b.shape) for b in back] == [g.shape for g in grads]
    for got, want in zip(back, grads, strict=True):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("name", ["2d-s2-k3-same-op1-d1", "3d-asymmetric", "2d-valid_op1_no_bias"])
@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_kronecker_update_solves_the_damped_system_in_the_keras_layout(name, method):
    block, record, grads, _, _ = _recorded(name)
    factors = block.statistics([record], [grads], B)
    payloads = []
    for index in range(2):
        payload, retries = block.invert(index, factors, DAMPING, method)
        assert int(retries) == 0
        payloads.append(payload)
    rng = np.random.default_rng(6)
    grad = [rng.normal(size=v.shape) for v in block.variables]
    update = block.precondition(
        [tf.constant(g, tf.float32) for g in grad], payloads, DAMPING, method
    )

    a, g = (f.numpy().astype(np.float64) for f in factors)
    has_bias = len(grad) == 2
    matrix = _numpy_gradient_matrix(grad[0], grad[1] if has_bias else None)
    if method == CHOLESKY:
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(g) / len(g)))
        root = np.sqrt(DAMPING)
        solved = (
            np.linalg.inv(a + pi * root * np.eye(len(a)))
            @ matrix
            @ np.linalg.inv(g + root / pi * np.eye(len(g)))
        )
    else:
        # Row-major vec: vec(A X G) = (A ⊗ G) vec(X) for symmetric G.
        system = np.kron(a, g) + DAMPING * np.eye(len(a) * len(g))
        solved = np.linalg.solve(system, matrix.reshape(-1)).reshape(matrix.shape)
    expected = _numpy_keras_layout(solved, block.variables[0].shape, has_bias)
    assert len(update) == len(expected)
    for got, want in zip(update, expected, strict=True):
        assert tuple(got.shape) == want.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-3, atol=1e-4 * np.abs(want).max())


# --- one exact step on a linear transposed convolution ----------------------------

EXACT_STEP_CASES = {
    "2d-same_strided": (
        CONV2DT,
        (2, 2, 1),
        dict(filters=2, kernel_size=3, strides=2, padding="same"),
    ),
    "1d-valid_op1_no_bias": (
        CONV1DT,
        (3, 2),
        dict(filters=2, kernel_size=2, strides=2, output_padding=1, use_bias=False),
    ),
    "3d-same": (
        CONV3DT,
        (2, 2, 2, 1),
        dict(filters=1, kernel_size=2, strides=(1, 2, 2), padding="same"),
    ),
}


@pytest.mark.parametrize("name", list(EXACT_STEP_CASES))
def test_one_exact_step_on_a_linear_transposed_conv_reaches_least_squares(float64, name):
    """MSE on per-position targets: the Fisher is Σ_t ā āᵀ ⊗ I, so KFC is exact.

    One step at learning rate 1 with a tiny eigen damping is Newton's: the
    kernel solves least squares of the targets on the definition's patches.
    """
    cls, shape, config = EXACT_STEP_CASES[name]
    keras.utils.set_random_seed(3)
    layer = cls(**config)
    model = keras.Sequential([keras.Input(shape), layer])
    rng = np.random.default_rng(4)
    b = 6
    x = rng.normal(size=(b, *shape))
    y = rng.normal(size=(b, *model.compute_output_shape((b, *shape))[1:]))
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

    design = _reference_patches(layer, x).reshape(-1, int(np.prod(layer.kernel_size)) * shape[-1])
    if layer.bias is not None:
        design = _with_ones(design)
    assert np.linalg.matrix_rank(design) == design.shape[1]
    solution = np.linalg.lstsq(design, y.reshape(-1, layer.filters), rcond=None)[0]
    bias = layer.bias.numpy() if layer.bias is not None else None
    got = _reference_matrix(layer, layer.kernel.numpy(), bias)
    np.testing.assert_allclose(got, solution, rtol=1e-6, atol=1e-6 * np.abs(solution).max())


# --- a decoder ----------------------------------------------------------------------


def _decoder(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(2 * 2 * 3, activation="tanh", name="dense"),
            keras.layers.Reshape((2, 2, 3)),
            keras.layers.Conv2DTranspose(
                4, 3, strides=2, padding="same", activation="relu", name="up1"
            ),
            keras.layers.Conv2DTranspose(3, 2, strides=2, name="up2"),
            keras.layers.Conv2D(1, 3, padding="same", name="head"),
        ]
    )


def test_conv_transpose_decoder_registers_every_layer_and_kfac_lowers_the_loss():
    model = _decoder(seed=0)
    found = {b.name: type(b) for b in registration.collect_blocks(model)}
    assert found == {
        "dense": DenseBlock,
        "up1": ConvTransposeBlock,
        "up2": ConvTransposeBlock,
        "head": ConvBlock,
    }
    x = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    y = _decoder(seed=7).predict(x, verbose=0)  # a teacher of the same shape: learnable
    opt = kfac.Kfac(
        learning_rate=0.3,
        damping=0.01,
        model=model,
        loss="mse",
        unsupported_layers="error",
        invert_every=1,
    )
    model.compile(optimizer=opt, loss="mse")
    before = model.evaluate(x, y, batch_size=32, verbose=0)
    model.fit(x, y, batch_size=32, epochs=5, verbose=0, shuffle=False)
    after = model.evaluate(x, y, batch_size=32, verbose=0)
    assert np.isfinite(after) and after < 0.5 * before
