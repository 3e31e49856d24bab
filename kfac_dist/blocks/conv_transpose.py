"""Conv1DTranspose/Conv2DTranspose/Conv3DTranspose layers: KFC over the patches each output sees.

A transposed convolution is the adjoint of a convolution: output position t
gets Σ_k W_k x_{s(t,k)} over the kernel entries k whose input s(t,k)
exists. It equals a stride-1 convolution of the zero-inserted input (strides
- 1 zeros between neighbours), padded as the layer's output shape requires,
with the kernel flipped and its channel axes swapped. The block is the
ConvBlock over that convolution's patches: Ω = E[Σ_t ā_t ā_tᵀ], Γ over the
output positions; the gradient matrix is the flipped, channel-swapped
kernel (`kernel_matrix`), mapped back onto Keras' (*kernel_size, filters,
in_channels) layout exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from keras.src.backend.common.backend_utils import compute_conv_transpose_output_shape

from kfac_dist.blocks.conv import ConvBlock, channels_last, dimension
from kfac_dist.blocks.patch_moments import Geometry, patches_of
from kfac_dist.blocks.records import Record, rows, with_ones
from kfac_dist.linalg import curvature_dtype


class ConvTransposeBlock(ConvBlock):
    """K-FAC for `keras.layers.Conv1DTranspose`, `Conv2DTranspose` and `Conv3DTranspose`."""

    def input_rows(self, record: Record) -> tf.Tensor:
        patches = transposed_patches(self._layer, tf.cast(record.inputs, curvature_dtype()))
        a = rows(patches)
        return with_ones(a) if self.has_bias else a

    def view_source(self, record: Record) -> tuple[tf.Tensor, Geometry, bool]:
        """The zero-inserted input (channels last), read by a stride-1 convolution.

        Its padding is the geometry's `before` (no padded copy is made; the
        trailing zeros past the last input never meet a kernel offset that
        an output reads, as `transposed_paddings` places them).
        """
        layer = self._layer
        inputs = channels_last(layer, record.inputs)
        for axis, stride in enumerate(layer.strides, start=1):
            inputs = _zero_insert_and_pad(inputs, axis, stride, 0, stride - 1)
        outputs = channels_last(layer, record.outputs)
        rank = layer.rank
        geometry = Geometry(
            tuple(layer.kernel_size),
            (1,) * rank,
            tuple(layer.dilation_rate),
            tuple(before for before, _ in transposed_paddings(layer)),
            tuple(dimension(inputs, a) for a in range(1, rank + 1)),
            tuple(dimension(outputs, a) for a in range(1, rank + 1)),
        )
        return inputs, geometry, False

    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        *kernel_size, filters, channels = self.variables[0].shape
        fan_in = int(np.prod(kernel_size)) * int(channels) + int(self.has_bias)
        return (fan_in, fan_in), int(filters)

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        kernel = kernel_matrix(grads[0])
        if not self.has_bias:
            return kernel
        return tf.concat([kernel, tf.reshape(grads[1], [1, -1])], axis=0)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        kernel_shape = self.variables[0].shape
        if not self.has_bias:
            return [kernel_of_matrix(matrix, kernel_shape)]
        kernel, bias = tf.split(matrix, [matrix.shape[0] - 1, 1])
        return [kernel_of_matrix(kernel, kernel_shape), tf.reshape(bias, [-1])]

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        # The Dense block's per-example gradients come in the matrix's layout
        # (flipped kernel, in_channels before filters): put them in the
        # variables' own order, as the per-example interface promises.
        flat = super().per_example_gradients(records, output_grads)
        kernel_shape = self.variables[0].shape
        filters = int(kernel_shape[-2])
        matrices = tf.reshape(flat, [-1, flat.shape[-1] // filters, filters])
        kernel_rows = int(np.prod(kernel_shape)) // filters
        kernel = kernel_of_matrix(matrices[:, :kernel_rows], kernel_shape, leading=1)
        parts = [tf.reshape(kernel, [tf.shape(flat)[0], -1])]
        if self.has_bias:
            parts.append(matrices[:, kernel_rows])
        return tf.concat(parts, axis=1) if len(parts) > 1 else parts[0]


def kernel_matrix(kernel: tf.Tensor) -> tf.Tensor:
    """Keras' transposed kernel as the matrix that multiplies `transposed_patches`.

    (*kernel_size, filters, in_channels) → (kernel_size·in_channels, filters),
    kernel entries flipped.
    """
    rank = kernel.shape.rank - 2
    flipped = tf.reverse(kernel, axis=list(range(rank)))
    swapped = tf.transpose(flipped, [*range(rank), rank + 1, rank])
    return tf.reshape(swapped, [-1, kernel.shape[-2]])


def kernel_of_matrix(matrix: tf.Tensor, kernel_shape: Any, leading: int = 0) -> tf.Tensor:
    """Inverse of `kernel_matrix`; `leading` axes before the matrix ride along."""
    *kernel_size, filters, channels = (int(d) for d in kernel_shape)
    lead = [tf.shape(matrix)[i] for i in range(leading)]
    swapped = tf.reshape(matrix, [*lead, *kernel_size, channels, filters])
    rank = len(kernel_size)
    spatial = list(range(leading, leading + rank))
    flipped = tf.transpose(swapped, [*range(leading), *spatial, leading + rank + 1, leading + rank])
    return tf.reverse(flipped, axis=spatial)


def transposed_paddings(layer: Any) -> list[tuple[int, int]]:
    """(before, after) zero padding of the zero-inserted input, per spatial axis.

    Keras' output shape rule (`compute_conv_transpose_output_shape`, with
    output_padding) gives O = (I - 1)·s + e, e = its output for I = 1.
    TensorFlow runs the layer as the adjoint of a convolution of an O-long
    input with its own padding: p = max(span - e, 0) // 2 before ("same"; the
    rule gives 0 for "valid"), span = (k - 1)·d + 1. Output t then reads input
    i through kernel entry j where i·s = t + p - j·d, which is the stride-1
    convolution of the zero-inserted input padded by span - 1 - p before and
    e + p - 1 after with the flipped kernel. (An output no longer than
    (I - 1)·s, e = 0 with "same" and output_padding=0 for an even span, is one
    TensorFlow refuses to compute: such a layer never runs.)
    """
    rank = layer.rank
    unit = compute_conv_transpose_output_shape(
        (1,) * (rank + 2),
        layer.kernel_size,
        layer.filters,
        strides=layer.strides,
        padding=layer.padding,
        output_padding=layer.output_padding,
        data_format="channels_last",
        dilation_rate=layer.dilation_rate,
    )[1:-1]
    paddings = []
    for extent, k, d in zip(unit, layer.kernel_size, layer.dilation_rate):
        span = (k - 1) * d + 1
        before = max(span - extent, 0) // 2
        paddings.append((span - 1 - before, extent + before - 1))
    return paddings


def transposed_patches(layer: Any, inputs: tf.Tensor) -> tf.Tensor:
    """(b, *output_positions, kernel_size·in_channels) patches of a transposed convolution.

    Zero where no input reaches an output through a kernel entry; the
    entries come flipped (row-major), then the input channel, as
    `kernel_matrix` lays out the kernel.
    """
    inputs = channels_last(layer, inputs)
    for axis, (stride, (before, after)) in enumerate(
        zip(layer.strides, transposed_paddings(layer)), start=1
    ):
        inputs = _zero_insert_and_pad(inputs, axis, stride, before, after)
    rank = layer.rank
    return patches_of(inputs, layer.kernel_size, (1,) * rank, layer.dilation_rate, "valid")


def _zero_insert_and_pad(
    inputs: tf.Tensor, axis: int, stride: int, before: int, after: int
) -> tf.Tensor:
    """Along `axis`: stride - 1 zeros between neighbours, then `before`/`after` zeros."""
    rank = inputs.shape.rank
    if stride > 1:
        dims = [dimension(inputs, i) for i in range(rank)]
        spread = tf.expand_dims(inputs, axis + 1)
        widen = [[0, 0]] * (rank + 1)
        widen[axis + 1] = [0, stride - 1]
        spread = tf.pad(spread, widen)
        inputs = tf.reshape(spread, [*dims[:axis], dims[axis] * stride, *dims[axis + 1 :]])
        # Each input now ends with stride - 1 zeros: they count towards `after`.
        trailing = stride - 1
        if after < trailing:
            crop = [slice(None)] * rank
            crop[axis] = slice(0, dimension(inputs, axis) - (trailing - after))
            inputs = inputs[tuple(crop)]
            after = 0
        else:
            after -= trailing
    if before or after:
        pads = [[0, 0]] * rank
        pads[axis] = [before, after]
        inputs = tf.pad(inputs, pads)
    return inputs
