"""SeparableConvBlock against NumPy: the depthwise pairs (one per channel, grouped) over the
patches and the gradients at the depthwise output, the pointwise (Dense-like) pair over
[d, 1], the update against NumPy's block-diagonal solve, per-example gradients against
autodiff, and a small separable model trained.

No exact-step test: the layer is bilinear in (depthwise, pointwise) kernels, so its loss
is not quadratic in its weights and one K-FAC step is not a least-squares solve.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import (
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    GenericDiagonalBlock,
    SeparableConvBlock,
)
from kfac_dist.curvature import inversion_units
from tests.blocks.test_depthwise import (
    B,
    C,
    block_diagonal_update,
    channels_last,
    fit_losses,
    kron_moments,
    layer_patches,
    per_example_autodiff,
    preconditioned,
    record_case,
    with_ones,
)

CHANNELS = 3
SEPARABLE_2D = {
    "valid": dict(filters=4, kernel_size=3, depth_multiplier=2),
    "same_strided_no_bias": dict(
        filters=5, kernel_size=(3, 2), strides=2, padding="same", use_bias=False
    ),
    "channels_first": dict(
        filters=5, kernel_size=2, depth_multiplier=2, data_format="channels_first"
    ),
}
SEPARABLE_1D = {
    "valid": dict(filters=4, kernel_size=3, depth_multiplier=2),
    "same_strided_no_bias": dict(
        filters=2, kernel_size=2, strides=2, padding="same", use_bias=False
    ),
}
CASES = [(keras.layers.SeparableConv2D, n, c) for n, c in SEPARABLE_2D.items()] + [
    (keras.layers.SeparableConv1D, n, c) for n, c in SEPARABLE_1D.items()
]
IDS = [f"{cls.__name__}-{name}" for cls, name, _ in CASES]


def separable_case(cls, config, seed=0, approx=None):
    """The block, its record, output gradients, and NumPy's patches and depthwise output d."""
    rng = np.random.default_rng(seed)
    layer = cls(activation="tanh", **config)
    spatial = (6, 5) if cls is keras.layers.SeparableConv2D else (9,)
    x = rng.normal(size=(B, *spatial, CHANNELS))
    if config.get("data_format") == "channels_first":
        x = np.moveaxis(x, -1, 1)
    layer.build(x.shape)
    for variable in layer.trainable_variables:
        variable.assign(rng.normal(size=variable.shape))
    block = SeparableConvBlock(layer, approx)
    record, s, grads = record_case(block, x, seed)
    patches = layer_patches(layer, x)
    multiplier = layer.depth_multiplier
    depthwise = layer.depthwise_kernel.numpy().reshape(-1, CHANNELS, multiplier)
    d = np.einsum("btkc,kcm->btcm", patches, depthwise).reshape(B, patches.shape[1], -1)
    # The two stages reproduce the layer's own output exactly.
    want = d @ pointwise_matrix(layer)
    if layer.bias is not None:
        want = want + layer.bias.numpy()
    got = channels_last(s, layer).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    return block, record, grads, patches, d


def pointwise_matrix(layer):
    return layer.pointwise_kernel.numpy().reshape(-1, layer.filters)


def separable_pairs(block, patches, d, grads):
    """NumPy's depthwise (A_c, G_c) of every channel, then the pointwise (A, G)."""
    layer = block.layer
    multiplier = layer.depth_multiplier
    at_s = channels_last(grads, layer, column_axis=True).reshape(C, B, -1, layer.filters)
    # The gradients at d: the pointwise map is linear, ∂/∂d = W_pw ∂/∂s.
    at_d = (at_s @ pointwise_matrix(layer).T).reshape(C, B, -1, CHANNELS, multiplier)
    pairs = [kron_moments(patches[..., c], at_d[..., c, :], B) for c in range(CHANNELS)]
    inputs = with_ones(d) if layer.bias is not None else d
    return [*pairs, kron_moments(inputs, at_s, B)]


def separable_indices(block):
    """Each pair's parameters in [depthwise (k, C, M); pointwise (C·M, F); bias (F)]."""
    layer = block.layer
    k, multiplier = int(np.prod(layer.kernel_size)), layer.depth_multiplier
    depthwise = np.arange(k * CHANNELS * multiplier).reshape(k, CHANNELS, multiplier)
    start = depthwise.size
    width = CHANNELS * multiplier
    kernel = start + np.arange(width * layer.filters).reshape(width, layer.filters)
    rows = [kernel]
    if layer.bias is not None:
        rows.append(start + kernel.size + np.arange(layer.filters)[None])
    indices = [depthwise[:, c].ravel() for c in range(CHANNELS)]
    return [*indices, np.concatenate(rows).ravel()]


@pytest.mark.parametrize("cls, name, config", CASES, ids=IDS)
def test_factors_are_the_depthwise_pairs_and_the_pointwise_pair(float64, cls, name, config):
    block, record, grads, patches, d = separable_case(cls, config)
    factors = block.statistics([record], [tf.constant(grads)], B)
    layer = block.layer
    k, m = patches.shape[2], layer.depth_multiplier
    n = CHANNELS * m + int(layer.bias is not None)
    assert block.factor_names() == ["depthwise_A", "depthwise_G", "pointwise_A", "pointwise_G"]
    assert block.factor_shapes() == [
        (CHANNELS, k, k),
        (CHANNELS, m, m),
        (n, n),
        (layer.filters, layer.filters),
    ]
    assert block.group_counts() == [CHANNELS, CHANNELS, None, None]
    assert [tuple(f.shape) for f in factors] == block.factor_shapes()
    assert block.weighted_factors() == [True, False, True, False]
    pairs = separable_pairs(block, patches, d, grads)
    for c in range(CHANNELS):
        np.testing.assert_allclose(factors[0].numpy()[c], pairs[c][0], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(factors[1].numpy()[c], pairs[c][1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(factors[2].numpy(), pairs[-1][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(factors[3].numpy(), pairs[-1][1], rtol=1e-10, atol=1e-12)


def test_units_are_one_per_factor_with_the_depthwise_ones_grouped(float64):
    cls, _, config = CASES[0]
    block, *_ = separable_case(cls, config)
    units = inversion_units([block])
    assert [(u.name, u.dim, u.groups) for u in units] == [
        (f"{block.name}/depthwise_A", 9, CHANNELS),
        (f"{block.name}/depthwise_G", 2, CHANNELS),
        (f"{block.name}/pointwise_A", 7, 1),
        (f"{block.name}/pointwise_G", 4, 1),
    ]


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize(
    "cls, name, config", [CASES[0], CASES[2], CASES[4]], ids=[IDS[0], IDS[2], IDS[4]]
)
def test_update_is_numpys_block_diagonal_solve(float64, cls, name, config, method):
    block, record, grads, patches, d = separable_case(cls, config)
    factors = block.statistics([record], [tf.constant(grads)], B)
    rng = np.random.default_rng(5)
    grad_vars = [rng.normal(size=v.shape) for v in block.variables]
    flat = np.concatenate([g.ravel() for g in grad_vars])
    pairs = separable_pairs(block, patches, d, grads)
    want = block_diagonal_update(pairs, separable_indices(block), flat, method)
    got = preconditioned(block, factors, grad_vars, method)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
@pytest.mark.parametrize("case", [0, 4], ids=[IDS[0], IDS[4]])
def test_diagonal_and_full_statistics_are_autodiffs_per_example_gradients(float64, approx, case):
    cls, _, config = CASES[case]
    block, record, grads, *_ = separable_case(cls, config, approx=approx)
    (stat,) = block.statistics([record], [tf.constant(grads)], B)
    per_example = per_example_autodiff(block.layer, record.inputs.numpy(), grads)
    full = per_example.T @ per_example / B
    # Diagonal: the signed-gradient estimate, each column's batch gradient squared.
    signed = per_example.reshape(grads.shape[0], B, -1).sum(axis=1)
    want = (signed**2).sum(axis=0) / B if approx == DIAGONAL else full
    np.testing.assert_allclose(stat.numpy(), want, rtol=1e-9, atol=1e-12)


def separable_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(6, 3, strides=2, padding="same"),
            keras.layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 1),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_separable_model_registers_structured_and_trains(method):
    model = separable_model()
    opt, losses = fit_losses(model, inverse_method=method)
    blocks = opt.curvature.blocks
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    covered = {id(v) for b in blocks for v in b.variables}
    assert covered == {id(v) for v in model.trainable_variables}
    assert sum(isinstance(b, SeparableConvBlock) for b in blocks) == 1
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
