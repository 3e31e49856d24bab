"""The diagonal approximation's statistics against per-example gradients in NumPy.

Exact for Dense without positions ((ā²)ᵀ(g²), without the (C·b,
parameters) per-example tensor); for convolutions and the generic block,
the signed-gradient estimate: its formula, its exact expectation over
every sign pattern of the pseudo-loss (the exact diagonal), and for the
generic block exactness with one example.
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import (
    DIAGONAL,
    ConvBlock,
    ConvTransposeBlock,
    DenseBlock,
    GenericDiagonalBlock,
)
from kfac_dist.blocks.patch_moments import conv_geometry
from tests.blocks.test_patch_moments import _patches

B, C = 4, 2


def _initialized(layer, shape, seed=0):
    layer.build(shape)
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape))
    return layer


def _largest_tensor(function) -> int:
    return max(
        t.shape.num_elements() or 0
        for op in function.graph.get_operations()
        for t in op.outputs
        if t.dtype.is_floating
    )


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_diagonal_is_squared_outer_products_without_a_per_example_tensor(float64, use_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, 5))
    layer = _initialized(keras.layers.Dense(3, use_bias=use_bias), x.shape)
    block = DenseBlock(layer, DIAGONAL)
    _, record = block.record(layer, tf.constant(x))
    g = rng.normal(size=(C, B, 3))
    (stat,) = block.statistics([record], [tf.constant(g)], B)
    a = np.concatenate([x, np.ones((B, 1))], axis=1) if use_bias else x
    per_example = np.einsum("bi,cbo->cbio", a, g).reshape(C * B, -1)
    np.testing.assert_allclose(stat.numpy(), (per_example**2).sum(0) / B, rtol=1e-12)

    @tf.function
    def statistics(inputs: tf.Tensor, grads: tf.Tensor) -> tf.Tensor:
        _, rec = block.record(layer, inputs)
        return block.statistics([rec], [grads], B)[0]

    function = statistics.get_concrete_function(
        tf.TensorSpec(x.shape, tf.float64), tf.TensorSpec(g.shape, tf.float64)
    )
    assert _largest_tensor(function) < C * B * block.num_params


def _conv_per_example(layer, xs, recs, grads) -> np.ndarray:
    """(C, b, parameters): Σ_r Σ_t ā_t g_tᵀ of each column and example, from NumPy patches."""
    per_example = 0
    for x, r, g in zip(xs, recs, grads):
        patches = _patches(x, conv_geometry(layer, r.inputs, r.outputs))
        patches = patches.reshape(B, -1, patches.shape[-1])
        if layer.bias is not None:
            patches = np.concatenate([patches, np.ones((*patches.shape[:2], 1))], axis=2)
        g_rows = g.reshape(g.shape[0], B, -1, layer.filters)
        per_example = per_example + np.einsum("bti,cbto->cbio", patches, g_rows)
    return per_example.reshape(*per_example.shape[:2], -1)


CONV_CASES = [
    ((6, 5, 2), dict(filters=3, kernel_size=3, strides=2, padding="same"), 1),
    ((7, 2), dict(filters=2, kernel_size=3, dilation_rate=2, padding="causal"), 1),
    ((6, 5, 2), dict(filters=2, kernel_size=2, use_bias=False), 2),  # a shared layer
]


def _conv_case(shape, config, records, columns, seed=1):
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(records, B, *shape))
    cls = keras.layers.Conv2D if len(shape) == 3 else keras.layers.Conv1D
    layer = _initialized(cls(**config), xs[0].shape)
    block = ConvBlock(layer, DIAGONAL)
    recs = [block.record(layer, tf.constant(x))[1] for x in xs]
    grads = [rng.normal(size=(columns, *r.outputs.shape)) for r in recs]
    return layer, block, xs, recs, grads


@pytest.mark.parametrize("shape, config, records", CONV_CASES)
def test_conv_diagonal_is_the_squared_signed_batch_gradient(float64, shape, config, records):
    layer, block, xs, recs, grads = _conv_case(shape, config, records, columns=C)
    (stat,) = block.statistics(recs, [tf.constant(g) for g in grads], B)
    batch_gradients = _conv_per_example(layer, xs, recs, grads).sum(axis=1)  # (C, parameters)
    np.testing.assert_allclose(stat.numpy(), (batch_gradients**2).sum(0) / B, rtol=1e-10)


@pytest.mark.parametrize("shape, config, records", CONV_CASES[:2])
def test_conv_diagonal_over_every_sign_pattern_is_the_exact_diagonal(
    float64, shape, config, records
):
    """The pseudo-loss signs each example's g: the mean over all 2^b patterns is (1/b) Σ ĝ²."""
    layer, block, xs, recs, grads = _conv_case(shape, config, records, columns=1)
    patterns = list(itertools.product((-1.0, 1.0), repeat=B))
    total = 0
    for r in patterns:
        sign = np.array(r).reshape(1, B, *[1] * (grads[0].ndim - 2))
        total = total + block.statistics(recs, [tf.constant(g * sign) for g in grads], B)[0]
    per_example = _conv_per_example(layer, xs, recs, grads)[0]
    exact = (per_example**2).sum(axis=0) / B
    np.testing.assert_allclose(total.numpy() / len(patterns), exact, rtol=1e-9)


def test_transposed_conv_diagonal_follows_the_variables_layout(float64):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, 4, 3, 2))
    layer = keras.layers.Conv2DTranspose(3, (3, 2), strides=2, padding="same")
    layer = _initialized(layer, x.shape)
    block = ConvTransposeBlock(layer, DIAGONAL)
    _, record = block.record(layer, tf.constant(x))
    g = tf.constant(rng.normal(size=(C, *record.outputs.shape)))
    (stat,) = block.statistics([record], [g], B)
    per_example = block.per_example_gradients([record], [g]).numpy()  # variables' order
    signed = per_example.reshape(C, B, -1).sum(axis=1)
    np.testing.assert_allclose(stat.numpy(), (signed**2).sum(0) / B, rtol=1e-10)


def test_generic_estimate_is_unbiased_over_the_signs_and_exact_for_one_example():
    """E_r[(Σ_i r_i ĝ_i)²]/b = Σ_i ĝ_i²/b over independent signs r: every pattern of 4."""
    rng = np.random.default_rng(3)
    block = GenericDiagonalBlock("generic", [keras.Variable(np.zeros((3, 2), np.float32))])
    per_example = rng.normal(size=(B, 6))
    patterns = list(itertools.product((-1.0, 1.0), repeat=B))
    mean = sum(
        block.statistics([], [tf.constant((np.array(r) @ per_example).reshape(1, 3, 2))], B)[0]
        for r in patterns
    ) / len(patterns)
    np.testing.assert_allclose(mean.numpy(), (per_example**2).sum(0) / B, rtol=1e-5)
    (one,) = block.statistics([], [tf.constant(per_example[:1].reshape(1, 3, 2))], 1)
    np.testing.assert_allclose(one.numpy(), per_example[0] ** 2, rtol=1e-5)
