"""GroupedConvBlock (Conv1D/Conv2D with groups > 1) against a NumPy im2col: one Kronecker
pair per group, the update against NumPy's block-diagonal solve, one exact step to least
squares, registration, and a RegNet-like model trained."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist import registration
from kfac_dist.blocks import (
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    ConvBlock,
    GenericDiagonalBlock,
    GroupedConvBlock,
    conv_block,
)
from tests.blocks.test_depthwise import (
    B,
    C,
    block_diagonal_update,
    channels_last,
    exact_kfac,
    fit_losses,
    kron_moments,
    layer_patches,
    per_example_autodiff,
    preconditioned,
    record_case,
    with_ones,
)

CONV2D = {
    "valid": dict(filters=4, kernel_size=3, groups=2, channels=4),
    "same_strided_asymmetric_no_bias": dict(
        filters=6,
        kernel_size=(3, 2),
        strides=(2, 1),
        padding="same",
        groups=3,
        channels=6,
        use_bias=False,
    ),
    "same_dilated": dict(
        filters=4, kernel_size=2, dilation_rate=2, padding="same", groups=2, channels=2
    ),
    "channels_first": dict(
        # 6 filters, not 4: Keras 3.15's ops.add takes a (1, F, 1, 1) bias for a
        # channels-last one when the output's last axis (width 4 here) is F.
        filters=6,
        kernel_size=2,
        groups=2,
        channels=4,
        data_format="channels_first",
    ),
}
CONV1D = {
    "causal_dilated": dict(
        filters=6, kernel_size=3, dilation_rate=2, padding="causal", groups=2, channels=4
    ),
    "same_strided_no_bias": dict(
        filters=4, kernel_size=3, strides=2, padding="same", groups=2, channels=6, use_bias=False
    ),
}
CASES = [(keras.layers.Conv2D, n, c) for n, c in CONV2D.items()] + [
    (keras.layers.Conv1D, n, c) for n, c in CONV1D.items()
]
IDS = [f"{cls.__name__}-{name}" for cls, name, _ in CASES]


def grouped_case(cls, config, seed=0, approx=None):
    """The block, its record, the output gradients and NumPy's patches (b, T, k, C_in)."""
    config = dict(config)
    channels = config.pop("channels")
    rng = np.random.default_rng(seed)
    layer = cls(activation="tanh", **config)
    spatial = (6, 5) if cls is keras.layers.Conv2D else (9,)
    x = rng.normal(size=(B, *spatial, channels))
    if config.get("data_format") == "channels_first":
        x = np.moveaxis(x, -1, 1)
    layer.build(x.shape)
    layer.kernel.assign(rng.normal(size=layer.kernel.shape))
    if layer.bias is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape))
    block = GroupedConvBlock(layer, approx)
    record, s, grads = record_case(block, x, seed)
    patches = layer_patches(layer, x)
    # The patch rows reproduce the layer's own output exactly: group j's outputs
    # are its channels' patches times its filters.
    got = channels_last(s, layer).reshape(B, patches.shape[1], layer.filters)
    for inputs, filters in group_slices(layer):
        kernel = layer.kernel.numpy().reshape(-1, layer.filters)[:, filters]
        want = patches[..., inputs].reshape(B, patches.shape[1], -1) @ kernel
        if layer.bias is not None:
            want = want + layer.bias.numpy()[filters]
        np.testing.assert_allclose(got[..., filters], want, rtol=1e-10, atol=1e-10)
    return block, record, grads, patches


def group_slices(layer):
    """(input channels, filters) of each group."""
    groups = layer.groups
    per_input = layer.kernel.shape[-2]
    per_output = layer.filters // groups
    return [
        (slice(j * per_input, (j + 1) * per_input), slice(j * per_output, (j + 1) * per_output))
        for j in range(groups)
    ]


def grouped_pairs(block, patches, grads):
    """NumPy's (A_j, G_j) of every group."""
    layer = block.layer
    outputs = channels_last(grads, layer, column_axis=True).reshape(C, B, -1, layer.filters)
    pairs = []
    for inputs, filters in group_slices(layer):
        rows = patches[..., inputs].reshape(B, patches.shape[1], -1)
        if layer.bias is not None:
            rows = with_ones(rows)
        pairs.append(kron_moments(rows, outputs[..., filters], B))
    return pairs


def grouped_indices(block):
    """Each group's parameters in the flat [kernel (k·C_in/g, F); bias (F)] vector, row-major."""
    layer = block.layer
    fan_in = int(np.prod(layer.kernel.shape[:-1]))
    kernel = np.arange(fan_in * layer.filters).reshape(fan_in, layer.filters)
    bias = fan_in * layer.filters + np.arange(layer.filters)
    indices = []
    for _, filters in group_slices(layer):
        rows = [kernel[:, filters]] + ([bias[filters][None]] if layer.bias is not None else [])
        indices.append(np.concatenate(rows).ravel())
    return indices


@pytest.mark.parametrize("cls, name, config", CASES, ids=IDS)
def test_factors_are_each_groups_patch_and_output_moments(float64, cls, name, config):
    block, record, grads, patches = grouped_case(cls, config)
    a, g = block.statistics([record], [tf.constant(grads)], B)
    layer = block.layer
    n = int(np.prod(layer.kernel.shape[:-1])) + int(layer.bias is not None)
    m = layer.filters // layer.groups
    assert block.factor_shapes() == [(layer.groups, n, n), (layer.groups, m, m)]
    assert block.group_counts() == [layer.groups] * 2
    assert [tuple(a.shape), tuple(g.shape)] == block.factor_shapes()
    for j, (want_a, want_g) in enumerate(grouped_pairs(block, patches, grads)):
        np.testing.assert_allclose(a.numpy()[j], want_a, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g.numpy()[j], want_g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize(
    "cls, name, config", [CASES[0], CASES[1], CASES[4]], ids=[IDS[0], IDS[1], IDS[4]]
)
def test_update_is_numpys_block_diagonal_solve(float64, cls, name, config, method):
    block, record, grads, patches = grouped_case(cls, config)
    factors = block.statistics([record], [tf.constant(grads)], B)
    rng = np.random.default_rng(5)
    grad_vars = [rng.normal(size=v.shape) for v in block.variables]
    flat = np.concatenate([g.ravel() for g in grad_vars])
    want = block_diagonal_update(
        grouped_pairs(block, patches, grads), grouped_indices(block), flat, method
    )
    got = preconditioned(block, factors, grad_vars, method)
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
@pytest.mark.parametrize("case", [1, 4], ids=[IDS[1], IDS[4]])
def test_diagonal_and_full_statistics_are_autodiffs_per_example_gradients(float64, approx, case):
    cls, _, config = CASES[case]
    block, record, grads, _ = grouped_case(cls, config, approx=approx)
    (stat,) = block.statistics([record], [tf.constant(grads)], B)
    per_example = per_example_autodiff(block.layer, record.inputs.numpy(), grads)
    full = per_example.T @ per_example / B
    # Diagonal: the signed-gradient estimate, each column's batch gradient squared.
    signed = per_example.reshape(grads.shape[0], B, -1).sum(axis=1)
    want = (signed**2).sum(axis=0) / B if approx == DIAGONAL else full
    np.testing.assert_allclose(stat.numpy(), want, rtol=1e-9, atol=1e-12)


def test_one_exact_step_reaches_each_groups_least_squares(float64):
    rng = np.random.default_rng(3)
    keras.utils.set_random_seed(3)
    layer = keras.layers.Conv2D(4, 2, groups=2, padding="same")
    model = keras.Sequential([keras.Input((4, 5, 4)), layer])
    x = rng.normal(size=(24, 4, 5, 4))
    y = rng.normal(size=(24, 4, 5, 4))
    model.compile(optimizer=exact_kfac(model), loss="mse")
    model.fit(x, y, batch_size=24, epochs=1, verbose=0, shuffle=False)
    patches = layer_patches(layer, x)
    kernel = layer.kernel.numpy().reshape(-1, 4)
    for inputs, filters in group_slices(layer):
        design = with_ones(patches[..., inputs].reshape(24 * patches.shape[1], -1))
        targets = y.reshape(-1, 4)[:, filters]
        solution = np.linalg.lstsq(design, targets, rcond=None)[0]
        got = np.concatenate([kernel[:, filters], layer.bias.numpy()[filters][None]])
        np.testing.assert_allclose(got, solution, rtol=1e-6, atol=1e-8)


def test_registration_dispatches_on_groups():
    plain = keras.layers.Conv2D(4, 3)
    plain.build((None, 5, 5, 4))
    grouped = keras.layers.Conv1D(4, 3, groups=2)
    grouped.build((None, 7, 4))
    assert type(conv_block(plain)) is ConvBlock
    assert type(conv_block(grouped)) is GroupedConvBlock
    assert registration.BLOCK_OF_LAYER[keras.layers.Conv1D] is conv_block
    assert registration.BLOCK_OF_LAYER[keras.layers.Conv2D] is conv_block
    with pytest.raises(ValueError, match="groups=1.*ConvBlock"):
        GroupedConvBlock(plain)


def regnet_like():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(8, 3, strides=2, padding="same"),
            keras.layers.Conv2D(8, 3, padding="same", groups=2),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Conv2D(12, 1),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_regnet_like_model_registers_structured_and_trains(method):
    model = regnet_like()
    opt, losses = fit_losses(model, inverse_method=method)
    blocks = opt.curvature.blocks
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    covered = {id(v) for b in blocks for v in b.variables}
    assert covered == {id(v) for v in model.trainable_variables}
    assert sum(isinstance(b, GroupedConvBlock) for b in blocks) == 1
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0]
