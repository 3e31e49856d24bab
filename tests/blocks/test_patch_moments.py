"""Patch moments from views and from chunks of examples (blocks/patch_moments.py) against a
NumPy im2col.

The conv blocks' own tests cover every geometry through the blocks; these
cover what they do not: sample weights (per example and per position),
several records, groups, spatial sizes known only at run time, kernel
offsets that never meet the input, a last chunk that is not full, and the
memory bound (no tensor in the statistics graph, loop bodies included,
larger than the input).
"""

from __future__ import annotations

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import ConvBlock, DepthwiseConvBlock
from kfac_dist.blocks.patch_moments import (
    Geometry,
    conv_geometry,
    examples_per_chunk,
    moments_from_chunks,
    patch_moments,
)
from kfac_dist.jobs.statistics_benchmark import largest_tensor_bytes

B = 3


def _patches(x: np.ndarray, geometry: Geometry) -> np.ndarray:
    """(b, *outputs, offsets·channels) patches of a channels-last input, zero outside it."""
    b, *sizes, channels = x.shape
    outs = [int(o) for o in geometry.outputs]
    offsets = list(itertools.product(*(range(k) for k in geometry.kernel_size)))
    patches = np.zeros((b, *outs, len(offsets), channels))
    for position in itertools.product(*(range(o) for o in outs)):
        for e, offset in enumerate(offsets):
            source = [
                t * s + i * d - int(p)
                for t, s, i, d, p in zip(
                    position, geometry.strides, offset, geometry.dilation, geometry.before
                )
            ]
            if all(0 <= q < n for q, n in zip(source, sizes)):
                patches[(slice(None), *position, e)] = x[(slice(None), *source)]
    return patches.reshape(b, *outs, -1)


def _rows(patches: np.ndarray, bias: bool) -> np.ndarray:
    rows = patches.reshape(-1, patches.shape[-1])
    return np.concatenate([rows, np.ones((len(rows), 1))], axis=1) if bias else rows


def _conv(cls, x, seed=0, **config):
    layer = cls(**config)
    layer.build(x.shape)
    rng = np.random.default_rng(seed)
    for v in layer.weights:
        v.assign(rng.normal(size=v.shape))
    return layer


@pytest.mark.parametrize(
    "cls, shape, config",
    [
        (keras.layers.Conv2D, (6, 5, 2), dict(filters=2, kernel_size=3, strides=2, padding="same")),
        (keras.layers.Conv1D, (7, 2), dict(filters=2, kernel_size=3, padding="causal")),
        (keras.layers.Conv3D, (4, 3, 3, 2), dict(filters=1, kernel_size=2, dilation_rate=2)),
    ],
)
def test_weighted_factor_of_two_records_is_the_weighted_patch_moment(float64, cls, shape, config):
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(2, B, *shape))
    layer = _conv(cls, x1, **config)
    block = ConvBlock(layer)
    records = [block.record(layer, tf.constant(x))[1] for x in (x1, x2)]
    grads = [tf.constant(rng.normal(size=(1, *r.outputs.shape))) for r in records]
    w = rng.uniform(0.1, 2.0, size=B)
    a, _ = block.statistics(records, grads, B, tf.constant(w))
    expected = 0
    for x, r in zip((x1, x2), records):
        patches = _patches(x, conv_geometry(layer, r.inputs, r.outputs))
        rows = _rows(patches, True)
        row_w = np.repeat(w, len(rows) // B)
        expected = expected + rows.T @ (rows * row_w[:, None])
    np.testing.assert_allclose(a.numpy(), expected / B, rtol=1e-10, atol=1e-10)


def test_per_position_weights_weight_each_patch(float64):
    """A Conv1D whose output positions are the loss's: weights (b, L) row by row."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, 6, 3))
    layer = _conv(keras.layers.Conv1D, x, filters=2, kernel_size=3, padding="same")
    block = ConvBlock(layer)
    _, record = block.record(layer, tf.constant(x))
    w = rng.uniform(0.0, 1.0, size=(B, 6))
    grads = tf.constant(rng.normal(size=(1, *record.outputs.shape)))
    a, _ = block.statistics([record], [grads], B, tf.constant(w))
    rows = _rows(_patches(x, conv_geometry(layer, record.inputs, record.outputs)), True)
    expected = rows.T @ (rows * w.reshape(-1, 1)) / B
    np.testing.assert_allclose(a.numpy(), expected, rtol=1e-10, atol=1e-10)


def test_offsets_that_never_meet_the_input_give_zero_blocks(float64):
    """Kernel span 13 on a length-4 input ('same'): most offsets read only padding."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B, 4, 2))
    layer = _conv(keras.layers.Conv1D, x, filters=1, kernel_size=5, dilation_rate=3, padding="same")
    out = layer(x)
    geometry = conv_geometry(layer, tf.constant(x), out)
    got = patch_moments(tf.constant(x), geometry, bias=True)[0].numpy()
    rows = _rows(_patches(x, geometry), True)
    np.testing.assert_allclose(got, rows.T @ rows, rtol=1e-10, atol=1e-10)
    assert np.count_nonzero(np.abs(got).sum(axis=0) == 0) > 0  # some offsets never read the input


def test_channels_first_groups_and_run_time_sizes(float64):
    """Groups of channels, a channels-first input, and spatial sizes unknown when traced."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(B, 7, 6, 4))  # channels last
    groups = 2

    @tf.function(input_signature=[tf.TensorSpec([None, 4, None, None], tf.float64)])
    def moments(first: tf.Tensor) -> tf.Tensor:
        size = tf.shape(first)[2:]
        outputs = tuple(-(-size[a] // 2) for a in range(2))  # "same", stride 2
        before = tuple(tf.maximum((outputs[a] - 1) * 2 + 3 - size[a], 0) // 2 for a in range(2))
        geometry = Geometry((3, 3), (2, 2), (1, 1), before, (size[0], size[1]), outputs)
        return patch_moments(first, geometry, bias=True, groups=groups, channels_first=True)

    got = moments(tf.constant(np.moveaxis(x, -1, 1))).numpy()
    geometry = Geometry((3, 3), (2, 2), (1, 1), (1, 0), (7, 6), (4, 3))
    patches = _patches(x, geometry).reshape(-1, 9, groups, 2)
    for j in range(groups):
        rows = _rows(patches[:, :, j].reshape(len(patches), -1), True)
        np.testing.assert_allclose(got[j], rows.T @ rows, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("batch", [19, 20])
@pytest.mark.parametrize("weighted", [False, True])
def test_chunks_of_examples_add_up_to_the_batch_with_an_uneven_last_chunk(float64, batch, weighted):
    """2 examples per chunk (1 when weighted) at 16×16: 19 leaves a last chunk of one."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(batch, 16, 16, 2))
    layer = _conv(keras.layers.Conv2D, x, filters=1, kernel_size=3, padding="same")
    geometry = conv_geometry(layer, tf.constant(x), layer(x))
    assert examples_per_chunk(geometry, batch, weighted) == (1 if weighted else 2)
    w = rng.uniform(0.0, 2.0, size=(batch * 256,)) if weighted else None

    @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 2], tf.float64)])
    def moments(inputs: tf.Tensor) -> tf.Tensor:  # the batch known only at run time
        weights = None if w is None else tf.constant(w)
        return moments_from_chunks(inputs, geometry, weights, bias=True)[0]

    rows = _rows(_patches(x, geometry), True)
    row_w = np.ones(len(rows)) if w is None else w
    np.testing.assert_allclose(
        moments(tf.constant(x)).numpy(), rows.T @ (rows * row_w[:, None]), rtol=1e-10, atol=1e-9
    )


@pytest.mark.parametrize("strides", [1, 2])
@pytest.mark.parametrize("depthwise", [False, True])
def test_no_tensor_in_the_statistics_graph_is_larger_than_the_input(depthwise, strides):
    """The batch's patches (9× or 2.25× the input here) are never built.

    Stride 1 goes by views (no patch at all), stride 2 by chunks of
    examples: 18 of 16×16×2, whose patches at stride 2 are 2.25× their
    input, so a chunk holds 8 (4 with the weighted copy), half the input.
    Loop bodies are searched too.
    """
    x = np.random.default_rng(5).normal(size=(18, 16, 16, 2)).astype(np.float32)
    config = dict(kernel_size=3, strides=strides, padding="same")
    if depthwise:
        layer = _conv(keras.layers.DepthwiseConv2D, x, **config)
        block = DepthwiseConvBlock(layer)
    else:
        layer = _conv(keras.layers.Conv2D, x, filters=1, **config)
        block = ConvBlock(layer)

    @tf.function
    def statistics(inputs: tf.Tensor, weights: tf.Tensor) -> list[tf.Tensor]:
        _, record = block.record(layer, inputs)
        grads = tf.ones_like(record.outputs)[tf.newaxis]
        return block.statistics([record], [grads], 18, weights)

    function = statistics.get_concrete_function(
        tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec([18], tf.float32)
    )
    patches = largest_tensor_bytes(function.graph, "ExtractImagePatches")
    assert patches == (0 if strides == 1 else x.nbytes // 2)
    assert largest_tensor_bytes(function.graph) <= x.nbytes
