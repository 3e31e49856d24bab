"""EinsumDenseBlock, and Dense on inputs of any rank, against NumPy.

Each equation is read by hand here (which axes are rows, which are the
kernel's inputs and outputs), independently of the block's parser: the
factors of "expand" and "reduce", per-example gradients against autodiff,
the preconditioned update against NumPy's (A ⊗ G + λI)⁻¹ in both inverse
methods, one exact step to least squares where the block is exact, and the
layers it refuses with how to register them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.backend import set_keras_mask

import kfac_dist as kfac
from kfac_dist import registration
from kfac_dist.blocks import (
    CHOLESKY,
    EIGEN,
    FULL,
    ConvBlock,
    DenseBlock,
    EinsumDenseBlock,
    GenericDiagonalBlock,
)
from kfac_dist.blocks.einsum_dense import parse_equation
from kfac_dist.config import KfacConfig

B, C = 4, 2
DAMPING = 0.1
Array = np.ndarray


@dataclass(frozen=True)
class Case:
    """An EinsumDense configuration and NumPy's own reading of it."""

    equation: str
    output_shape: tuple
    bias_axes: str | None
    input_shape: tuple  # with the batch
    rows: Callable[[Array], Array]  # input (b, ...) -> (b·P, d_in) rows
    grad_rows: Callable[[Array], Array]  # output grads (C, b, ...) -> (C, b·P, d_out)
    kernel_matrix: Callable[[Array], Array]  # kernel -> (d_in, d_out)
    bias_rows: Callable[[Array], Array] = lambda bias: bias.reshape(1, -1)  # bias -> (P_b, d_out)
    bias_positions: int = 0  # one-hot columns of a per-position bias (0: a constant 1)

    def layer(self, use_bias: bool = True, seed: int = 0) -> keras.layers.EinsumDense:
        layer = keras.layers.EinsumDense(
            self.equation,
            output_shape=self.output_shape,
            bias_axes=self.bias_axes if use_bias else None,
            activation="tanh",
        )
        layer.build(self.input_shape)
        rng = np.random.default_rng(seed)
        for variable in layer.trainable_variables:
            variable.assign(rng.normal(size=variable.shape))
        return layer

    def input_rows(self, x: Array, use_bias: bool) -> Array:
        a = self.rows(x)
        if not use_bias:
            return a
        if not self.bias_positions:
            return np.concatenate([a, np.ones((len(a), 1))], axis=1)
        # Rows are example-major: row (i, t) gets the one-hot of its position t.
        onehot = np.tile(np.eye(self.bias_positions), (x.shape[0], 1))
        return np.concatenate([a, onehot], axis=1)

    def matrix(self, kernel: Array, bias: Array | None) -> Array:
        kernel = self.kernel_matrix(kernel)
        return kernel if bias is None else np.concatenate([kernel, self.bias_rows(bias)], axis=0)


T = 3
CASES = {
    "2d": Case(
        "ab,bc->ac",
        (3,),
        "c",
        (B, 4),
        rows=lambda x: x,
        grad_rows=lambda g: g,
        kernel_matrix=lambda k: k,
    ),
    "sequence": Case(
        "abc,cd->abd",
        (None, 3),
        "d",
        (B, T, 4),
        rows=lambda x: x.reshape(-1, 4),
        grad_rows=lambda g: g.reshape(C, -1, 3),
        kernel_matrix=lambda k: k,
    ),
    "heads_out": Case(  # MHA's query: heads × head_dim outputs
        "abc,cde->abde",
        (None, 2, 3),
        "de",
        (B, T, 4),
        rows=lambda x: x.reshape(-1, 4),
        grad_rows=lambda g: g.reshape(C, -1, 6),
        kernel_matrix=lambda k: k.reshape(4, 6),
    ),
    "heads_in": Case(  # MHA's output projection: heads × head_dim inputs
        "abcd,cde->abe",
        (None, 3),
        "e",
        (B, T, 2, 2),
        rows=lambda x: x.reshape(-1, 4),
        grad_rows=lambda g: g.reshape(C, -1, 3),
        kernel_matrix=lambda k: k.reshape(4, 3),
    ),
    "transposed_kernel": Case(  # the kernel stored as (outputs, inputs)
        "abc,dc->abd",
        (None, 3),
        "d",
        (B, T, 4),
        rows=lambda x: x.reshape(-1, 4),
        grad_rows=lambda g: g.reshape(C, -1, 3),
        kernel_matrix=lambda k: k.T,
    ),
    "position_bias": Case(  # a bias per sequence position: a one-hot input
        "abc,cd->abd",
        (T, 3),
        "bd",
        (B, T, 4),
        rows=lambda x: x.reshape(-1, 4),
        grad_rows=lambda g: g.reshape(C, -1, 3),
        kernel_matrix=lambda k: k,
        bias_rows=lambda bias: bias.reshape(T, 3),
        bias_positions=T,
    ),
    "ellipsis": Case(
        "...b,bc->...c",
        (3,),
        "c",
        (B, T, 4),
        rows=lambda x: x.reshape(-1, 4),
        grad_rows=lambda g: g.reshape(C, -1, 3),
        kernel_matrix=lambda k: k,
    ),
    "summed_axis": Case(  # the einsum sums the sequence away
        "abc,cd->ad",
        (3,),
        "d",
        (B, T, 4),
        rows=lambda x: x.sum(axis=1),
        grad_rows=lambda g: g,
        kernel_matrix=lambda k: k,
    ),
}
BIASED = [(name, True) for name in CASES] + [
    (name, False) for name in ("sequence", "heads_out", "heads_in")
]


def _record(block, layer, x, seed: int = 1):
    rng = np.random.default_rng(seed)
    output, record = block.record(layer.call, tf.convert_to_tensor(x))
    g = rng.normal(size=(C, *output.shape))
    return record, [tf.constant(g)], g


@pytest.fixture
def rng():
    return np.random.default_rng(3)


# --- the equation, read ---------------------------------------------------------


@pytest.mark.parametrize(
    "equation, rank, bias, expected",
    [
        ("ab,bc->ac", 2, "c", ("a", "", "b", "c", "", "c")),
        ("abc,cd->abd", 3, "d", ("ab", "", "c", "d", "", "d")),
        ("abc,cde->abde", 3, "de", ("ab", "", "c", "de", "", "de")),
        ("abcd,cde->abe", 4, "e", ("ab", "", "cd", "e", "", "e")),
        ("abc,cd->ad", 3, None, ("a", "b", "c", "d", "", "")),
        ("abc,bcd->abd", 3, None, ("a", "", "c", "d", "b", "")),
        ("abc,cd->abd", 3, "bd", ("ab", "", "c", "d", "", "bd")),
    ],
)
def test_equation_axes_are_classified(equation, rank, bias, expected):
    axes = parse_equation(equation, rank, bias)
    got = (
        axes.shared,
        axes.summed,
        axes.input_features,
        axes.output_features,
        axes.batched,
        axes.bias,
    )
    assert got == expected


def test_ellipsis_is_written_out_as_shared_axes():
    left = parse_equation("...b,bc->...c", 4)
    assert len(left.shared) == 3 and left.inputs == left.shared + "b"
    assert left.outputs == left.shared + "c"
    right = parse_equation("ab...,bc->ac...", 4)
    assert right.shared[0] == "a" and len(right.shared) == 3


# --- what it records, and the factors -------------------------------------------


def test_record_keeps_pre_activation_and_returns_activated_output(float64, rng):
    case = CASES["heads_out"]
    layer = case.layer()
    block = EinsumDenseBlock(layer)
    x = rng.normal(size=case.input_shape)
    output, record = block.record(layer.call, tf.constant(x))
    s = np.einsum("abc,cde->abde", x, layer.kernel.numpy()) + layer.bias.numpy()
    np.testing.assert_allclose(record.outputs.numpy(), s, rtol=1e-12)
    np.testing.assert_allclose(output.numpy(), np.tanh(s), rtol=1e-12)
    assert layer.activation is keras.activations.tanh  # restored


@pytest.mark.parametrize("name, use_bias", BIASED)
def test_expand_factors_are_row_second_moments(float64, rng, name, use_bias):
    case = CASES[name]
    layer = case.layer(use_bias)
    block = EinsumDenseBlock(layer)
    x = rng.normal(size=case.input_shape)
    record, grads, g = _record(block, layer, x)
    a_stat, g_stat = block.statistics([record], grads, B)
    rows = case.input_rows(x, use_bias)
    grad_rows = case.grad_rows(g)
    assert [tuple(s.shape) for s in (a_stat, g_stat)] == block.factor_shapes()
    np.testing.assert_allclose(a_stat.numpy(), rows.T @ rows / B, rtol=1e-10)
    expected_g = sum(grad_rows[c].T @ grad_rows[c] for c in range(C)) / len(rows)
    np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-10)


@pytest.mark.parametrize("name, use_bias", BIASED)
def test_reduce_factors_average_inputs_and_sum_gradients_per_example(float64, rng, name, use_bias):
    case = CASES[name]
    layer = case.layer(use_bias)
    block = EinsumDenseBlock(layer, kron_sharing="reduce")
    x = rng.normal(size=case.input_shape)
    record, grads, g = _record(block, layer, x)
    a_stat, g_stat = block.statistics([record], grads, B)
    rows = case.input_rows(x, use_bias)
    means = rows.reshape(B, -1, rows.shape[-1]).mean(axis=1)
    grad_rows = case.grad_rows(g)
    sums = grad_rows.reshape(C, B, -1, grad_rows.shape[-1]).sum(axis=2)
    np.testing.assert_allclose(a_stat.numpy(), means.T @ means / B, rtol=1e-10)
    expected_g = sum(sums[c].T @ sums[c] for c in range(C)) / B
    np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-10)


def test_two_uses_of_a_layer_are_two_terms_of_each_factor(float64, rng):
    case = CASES["heads_out"]
    layer = case.layer()
    for sharing in ("expand", "reduce"):
        block = EinsumDenseBlock(layer, kron_sharing=sharing)
        x1, x2 = rng.normal(size=(B, 2, 4)), rng.normal(size=(B, 5, 4))
        (r1, g1, n1), (r2, g2, n2) = _record(block, layer, x1), _record(block, layer, x2, 2)
        a_stat, g_stat = block.statistics([r1, r2], g1 + g2, B)
        rows = [case.input_rows(x, True) for x in (x1, x2)]
        grads = [case.grad_rows(g) for g in (n1, n2)]
        if sharing == "reduce":
            rows = [r.reshape(B, -1, r.shape[-1]).mean(1) for r in rows]
            grads = [g.reshape(C, B, -1, g.shape[-1]).sum(2) for g in grads]
        a, g = np.concatenate(rows), np.concatenate(grads, axis=1)
        np.testing.assert_allclose(a_stat.numpy(), a.T @ a / B, rtol=1e-10)
        expected_g = sum(g[c].T @ g[c] for c in range(C)) / len(a)
        np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-10)


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_a_keras_mask_leaves_padded_positions_out_of_the_input_factor(float64, rng, sharing):
    case = CASES["heads_out"]
    layer = case.layer()
    block = EinsumDenseBlock(layer, kron_sharing=sharing)
    x = rng.normal(size=case.input_shape)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    inputs = tf.constant(x)
    set_keras_mask(inputs, tf.constant(mask))
    record, grads, g = _record(block, layer, inputs)
    a_stat, _ = block.statistics([record], grads, B)
    rows = case.input_rows(x, True).reshape(B, T, -1)
    if sharing == "expand":
        valid = rows[mask]
        expected = valid.T @ valid / B
    else:  # the mean over each example's valid positions; none: ā = 0
        counts = np.maximum(mask.sum(1, keepdims=True), 1)
        means = (rows * mask[..., None]).sum(1) / counts
        expected = means.T @ means / B
    np.testing.assert_allclose(a_stat.numpy(), expected, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name, use_bias", BIASED)
def test_full_statistics_average_autodiff_per_example_gradients(float64, rng, name, use_bias):
    case = CASES[name]
    layer = case.layer(use_bias)
    block = EinsumDenseBlock(layer, FULL)
    x = rng.normal(size=case.input_shape)
    record, grads, g = _record(block, layer, x)
    (stat,) = block.statistics([record], grads, B)
    linear = keras.layers.EinsumDense(
        case.equation, case.output_shape, bias_axes=case.bias_axes if use_bias else None
    )
    linear.build(case.input_shape)
    linear.set_weights(layer.get_weights())
    per_example = []
    for c in range(C):
        for i in range(B):
            with tf.GradientTape() as tape:
                pseudo = tf.reduce_sum(tf.constant(g[c, i : i + 1]) * linear(x[i : i + 1]))
            parts = tape.gradient(pseudo, linear.trainable_variables)
            per_example.append(np.concatenate([p.numpy().ravel() for p in parts]))
    expected = sum(np.outer(p, p) for p in per_example) / B
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-10, atol=1e-12)


# --- the preconditioned update ----------------------------------------------------


def _spd(rng, n: int) -> Array:
    x = rng.normal(size=(n + 3, n))
    return x.T @ x / (n + 3)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize("name, use_bias", BIASED)
def test_precondition_solves_the_damped_kronecker_system(float64, rng, name, use_bias, method):
    case = CASES[name]
    layer = case.layer(use_bias)
    block = EinsumDenseBlock(layer)
    (n_in, _), n_out = block.kron_dims()
    a, g = _spd(rng, n_in) * 3.0, _spd(rng, n_out) * 0.2
    factors = [tf.constant(a), tf.constant(g)]
    payloads = []
    for index in range(2):
        payload, retries = block.invert(index, factors, DAMPING, method)
        assert int(retries) == 0
        payloads.append(payload)
    grads = [rng.normal(size=v.shape) for v in block.variables]
    update = block.precondition([tf.constant(v) for v in grads], payloads, DAMPING, method)
    assert [tuple(u.shape) for u in update] == [tuple(v.shape) for v in block.variables]
    matrix = case.matrix(grads[0], grads[1] if use_bias else None)
    if method == CHOLESKY:
        pi = np.sqrt((np.trace(a) / n_in) / (np.trace(g) / n_out))
        root = np.sqrt(DAMPING)
        expected = (
            np.linalg.inv(a + pi * root * np.eye(n_in))
            @ matrix
            @ np.linalg.inv(g + root / pi * np.eye(n_out))
        )
    else:
        system = np.kron(a, g) + DAMPING * np.eye(n_in * n_out)
        expected = np.linalg.solve(system, matrix.reshape(-1)).reshape(matrix.shape)
    got = case.matrix(update[0].numpy(), update[1].numpy() if use_bias else None)
    # rtol 1e-6: the Cholesky damping split reads λ as float32 (tf.cast of a Python float).
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-10)


# --- one exact step --------------------------------------------------------------


def _exact_kfac(model: keras.Model, **overrides) -> kfac.Kfac:
    arguments = dict(
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
    arguments.update(overrides)
    return kfac.Kfac(**arguments)


def _one_step(model: keras.Model, x: Array, y: Array, **overrides) -> kfac.Kfac:
    optimizer = _exact_kfac(model, **overrides)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    return optimizer


@pytest.mark.parametrize(
    "name", ["sequence", "heads_out", "heads_in", "position_bias", "summed_axis"]
)
def test_one_expand_step_reaches_least_squares_over_every_position(float64, name):
    """Per-position targets under MSE: positions are examples, and expand is exact."""
    case = CASES[name]
    rng = np.random.default_rng(5)
    n = 16
    keras.utils.set_random_seed(0)
    layer = keras.layers.EinsumDense(case.equation, case.output_shape, bias_axes=case.bias_axes)
    model = keras.Sequential([keras.Input(case.input_shape[1:]), layer])
    x = rng.normal(size=(n, *case.input_shape[1:]))
    y = rng.normal(size=tuple(model(x).shape))
    _one_step(model, x, y)
    design = case.input_rows(x, True)
    targets = y.reshape(len(design), -1)
    solution = np.linalg.lstsq(design, targets, rcond=None)[0]
    got = case.matrix(layer.kernel.numpy(), layer.bias.numpy())
    np.testing.assert_allclose(got, solution, rtol=1e-6, atol=1e-8)


def _pooled_model(kind: str) -> tuple[keras.Model, Callable[[Array], Array]]:
    """A layer linear in its kernel, its outputs averaged over positions before the loss.

    Returns the model and NumPy's design rows [mean input, 1] of one example each.
    """
    keras.utils.set_random_seed(0)
    if kind == "einsum":
        shape = (T, 4)
        body = [keras.layers.EinsumDense("abc,cde->abde", (None, 2, 3), bias_axes="de")]
        body += [keras.layers.Reshape((T, 6)), keras.layers.GlobalAveragePooling1D()]
    elif kind == "dense_sequence":
        shape = (T, 4)
        body = [keras.layers.Dense(3), keras.layers.GlobalAveragePooling1D()]
    else:  # Dense on an image
        shape = (2, 3, 4)
        body = [keras.layers.Dense(3), keras.layers.GlobalAveragePooling2D()]
    model = keras.Sequential([keras.Input(shape), *body])

    def design(x: Array) -> Array:
        means = x.reshape(len(x), -1, x.shape[-1]).mean(axis=1)
        return np.concatenate([means, np.ones((len(x), 1))], axis=1)

    return model, design


@pytest.mark.parametrize("kind", ["einsum", "dense_sequence", "dense_image"])
def test_one_reduce_step_reaches_least_squares_when_the_loss_sees_positions_pooled(float64, kind):
    """Example i's gradient is (mean_t ā_t) ĝ_iᵀ: reduce is exact here, expand is not."""
    rng = np.random.default_rng(6)
    model, design = _pooled_model(kind)
    x = rng.normal(size=(16, *model.input_shape[1:]))
    y = rng.normal(size=tuple(model(x).shape))
    results = {}
    for sharing in ("reduce", "expand"):
        model, _ = _pooled_model(kind)
        _one_step(model, x, y, kron_sharing=sharing)
        layer = model.layers[0]
        kernel = layer.kernel.numpy().reshape(x.shape[-1], -1)
        results[sharing] = np.concatenate([kernel, layer.bias.numpy().reshape(1, -1)])
    solution = np.linalg.lstsq(design(x), y, rcond=None)[0]
    np.testing.assert_allclose(results["reduce"], solution, rtol=1e-6, atol=1e-8)
    assert not np.allclose(results["expand"], solution, rtol=1e-3, atol=1e-3)


def test_reduce_is_the_exact_fisher_when_the_input_is_constant_over_positions(float64, rng):
    """F = (1/b) Σ_i Σ_c ĝ ĝᵀ with ĝ = Σ_t ā g_tᵀ = ā (Σ_t g_t)ᵀ: reduce's A ⊗ G, not expand's.

    The output gradients are the same square root of the loss's Hessian for
    every example (as for MSE), with columns that mix positions.
    """
    case = CASES["sequence"]
    layer = case.layer()
    x = np.repeat(rng.normal(size=(B, 1, 4)), T, axis=1)
    root = rng.normal(size=(C, T, 3))
    g = np.broadcast_to(root[:, None], (C, B, T, 3))
    rows = case.input_rows(x, True).reshape(B, T, -1)
    per_example = np.einsum("bti,cbto->cbio", rows, g).reshape(C * B, -1)
    fisher = per_example.T @ per_example / B
    kron = {}
    for sharing in ("reduce", "expand"):
        block = EinsumDenseBlock(layer, kron_sharing=sharing)
        _, record = block.record(layer.call, tf.constant(x))
        a_stat, g_stat = block.statistics([record], [tf.constant(g)], B)
        kron[sharing] = np.kron(a_stat.numpy(), g_stat.numpy())
    np.testing.assert_allclose(kron["reduce"], fisher, rtol=1e-10, atol=1e-12)
    assert not np.allclose(kron["expand"], fisher, rtol=1e-2)


# --- Dense on inputs of any rank ---------------------------------------------------


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_dense_on_an_image_has_the_factors_of_its_pixels(float64, rng, sharing):
    """Dense on (b, h, w, c) shares its kernel over h·w pixels, as EinsumDense "abcd,de->abce"."""
    dense = keras.layers.Dense(3)
    dense.build((None, 2, 3, 4))
    einsum = keras.layers.EinsumDense("abcd,de->abce", (2, 3, 3), bias_axes="e")
    einsum.build((None, 2, 3, 4))
    dense.kernel.assign(rng.normal(size=(4, 3)))
    einsum.set_weights(dense.get_weights())
    x = rng.normal(size=(B, 2, 3, 4))
    g = rng.normal(size=(C, B, 2, 3, 3))
    rows = np.concatenate([x.reshape(B, 6, 4), np.ones((B, 6, 1))], axis=2)
    grad_rows = g.reshape(C, B, 6, 3)
    if sharing == "reduce":
        rows, grad_rows = rows.mean(1, keepdims=True), grad_rows.sum(2, keepdims=True)
    rows, grad_rows = rows.reshape(-1, 5), grad_rows.reshape(C, -1, 3)
    expected = [
        rows.T @ rows / B,
        sum(grad_rows[c].T @ grad_rows[c] for c in range(C)) / len(rows),
    ]
    for block, layer in ((DenseBlock(dense, kron_sharing=sharing), dense),) + (
        (EinsumDenseBlock(einsum, kron_sharing=sharing), einsum),
    ):
        _, record = block.record(layer.call, tf.constant(x))
        factors = block.statistics([record], [tf.constant(g)], B)
        for got, want in zip(factors, expected, strict=True):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_dense_on_an_image_per_example_gradients_match_autodiff(float64, rng):
    dense = keras.layers.Dense(3)
    dense.build((None, 2, 3, 4))
    block = DenseBlock(dense, FULL)
    x = rng.normal(size=(B, 2, 3, 4))
    g = rng.normal(size=(C, B, 2, 3, 3))
    _, record = block.record(dense.call, tf.constant(x))
    (stat,) = block.statistics([record], [tf.constant(g)], B)
    per_example = []
    for c in range(C):
        for i in range(B):
            with tf.GradientTape() as tape:
                pseudo = tf.reduce_sum(tf.constant(g[c, i : i + 1]) * dense(x[i : i + 1]))
            kernel, bias = tape.gradient(pseudo, [dense.kernel, dense.bias])
            per_example.append(np.concatenate([kernel.numpy().ravel(), bias.numpy()]))
    expected = sum(np.outer(p, p) for p in per_example) / B
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_one_expand_step_of_dense_on_an_image_reaches_per_pixel_least_squares(float64):
    rng = np.random.default_rng(7)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2, 3, 4)), keras.layers.Dense(3)])
    x = rng.normal(size=(8, 2, 3, 4))
    y = rng.normal(size=(8, 2, 3, 3))
    _one_step(model, x, y)
    design = np.concatenate([x.reshape(-1, 4), np.ones((48, 1))], axis=1)
    solution = np.linalg.lstsq(design, y.reshape(-1, 3), rcond=None)[0]
    layer = model.layers[0]
    got = np.concatenate([layer.kernel.numpy(), layer.bias.numpy()[None]])
    np.testing.assert_allclose(got, solution, rtol=1e-6, atol=1e-8)


# --- the option, through Kfac ------------------------------------------------------


def test_kron_sharing_reaches_dense_and_einsum_blocks_but_not_convolutions():
    inputs = keras.Input((5, 4))
    h = keras.layers.Conv1D(3, 2, name="conv")(inputs)
    h = keras.layers.Dense(4, name="dense")(h)
    h = keras.layers.EinsumDense("abc,cd->abd", (None, 2), bias_axes="d", name="einsum")(h)
    model = keras.Model(inputs, h)
    optimizer = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, kron_sharing="reduce")
    sharing = {b.name: getattr(b, "kron_sharing", None) for b in optimizer.curvature.blocks}
    assert sharing == {"conv": "expand", "dense": "reduce", "einsum": "reduce"}
    assert isinstance(optimizer.curvature.blocks[0], ConvBlock)
    assert optimizer.get_config()["kron_sharing"] == "reduce"
    default = registration.collect_blocks(model)
    assert [getattr(b, "kron_sharing", None) for b in default] == ["expand"] * 3


def test_kron_sharing_is_validated():
    with pytest.raises(ValueError, match="kron_sharing"):
        KfacConfig(learning_rate=0.1, damping=0.1, kron_sharing="mean")
    layer = keras.layers.Dense(2)
    layer.build((None, 3))
    with pytest.raises(ValueError, match="kron_sharing"):
        DenseBlock(layer, kron_sharing="mean")


# --- what is refused, and how to register it ---------------------------------------


REFUSED = {
    # equation, output shape, bias axes, input shape: what the error names
    "batched": (("abc,bcd->abd", (2, 3), None, (None, 2, 4)), "kernel axis b"),
    "tied_bias": (("abc,cde->abde", (None, 2, 3), "e", (None, 3, 4)), "leaves out output axis d"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_a_layer_that_is_not_one_kronecker_block_is_refused_with_how_to_register_it(kind):
    (equation, output_shape, bias_axes, shape), named = REFUSED[kind]
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes, name="mixer")
    layer.build(shape)
    with pytest.raises(ValueError, match=named) as error:
        EinsumDenseBlock(layer)
    message = str(error.value)
    assert "'mixer'" in message
    assert "unsupported_layers='diagonal'" in message and "register_generic" in message

    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, layer(inputs))
    with pytest.raises(registration.UnsupportedLayerError, match=named) as error:
        registration.collect_blocks(model)
    assert "'mixer' (EinsumDense" in str(error.value)
    with pytest.raises(registration.UnsupportedLayerError, match=named):
        kfac.LayerCollection().register_layer(layer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (block,) = registration.collect_blocks(model, unsupported_layers="diagonal")
    assert isinstance(block, GenericDiagonalBlock)
    assert [v.path for v in block.variables] == [v.path for v in layer.trainable_variables]
    assert any("diagonal block" in str(w.message) for w in caught)


def test_the_mask_of_an_embedding_reaches_the_einsum_layer_in_a_model():
    keras.utils.set_random_seed(0)
    tokens = keras.Input((5,), dtype="int32")
    h = keras.layers.Embedding(7, 4, mask_zero=True, name="embedding")(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EinsumDense drops the mask after its input
        h = keras.layers.EinsumDense("abc,cde->abde", (5, 2, 3), bias_axes="de", name="heads")(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(tokens, keras.layers.Dense(2)(h))
    optimizer = kfac.Kfac(
        learning_rate=0.1, damping=0.1, model=model, loss="mse", cov_ema_decay=0.0
    )
    model.compile(optimizer=optimizer, loss="mse")
    x = np.array([[1, 2, 3, 0, 0], [4, 0, 0, 0, 0], [1, 1, 1, 1, 1], [2, 3, 0, 0, 0]], "int32")
    embeddings = model.get_layer("embedding").embeddings.numpy().copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x, np.zeros((4, 2)), batch_size=4, epochs=1, verbose=0)
    names = [b.name for b in optimizer.curvature.blocks]
    a_einsum = optimizer.curvature.factors()[2 * names.index("heads")].numpy()
    valid = x != 0
    rows = np.concatenate([embeddings[x[valid]], np.ones((valid.sum(), 1))], axis=1)
    np.testing.assert_allclose(a_einsum, rows.T @ rows / 4, rtol=1e-5, atol=1e-7)
