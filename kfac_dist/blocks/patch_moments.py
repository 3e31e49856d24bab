"""Convolution patch statistics from shifted views of the input, never the patches themselves.

A convolution's patch at output position t holds, for each kernel offset i,
the input seen at offset i: x[t·s + i·d - p] (zero outside the input). The
view X_i — that input at every output position — is a strided slice of the
input, no larger than it. The input factor's (i, j) block is therefore
Σ_t w_t X_i[t] X_j[t]ᵀ, one matmul of two views, and the bias row of block
i is Σ_t w_t X_i[t]. A pair only needs the output positions where both
offsets fall inside the input (the padding contributes zeros), so each view
is sliced to that box and no padded copy of the input is made.

`patch_moments` builds the (symmetric) factor from the k(k+1)/2 pairs j ≥ i
of the k kernel offsets: the flops of the patch matmul PᵀP (half of them,
by symmetry), memory for two views at a time instead of the k views of P.
Each pair's slices are made after the previous pair's product (control
dependencies), so a graph never holds more than the two views of one pair
(plus a transient copy when a view is cast, weighted or transposed from
channels-first). `per_example_patch_products` is Σ_t X_i[t] g_tᵀ per example,
offset by offset, for the per-example gradients ("full" blocks).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.linalg import curvature_dtype

#: An int where the shape is static, else a scalar int32 tensor.
Size = Any


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Where a convolution reads its input: per spatial axis, the view of each kernel offset.

    Output t along an axis reads input t·stride + i·dilation - before for
    kernel offset i; `sizes` are the input's extents, `outputs` the output's.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    before: tuple[Size, ...]
    sizes: tuple[Size, ...]
    outputs: tuple[Size, ...]

    def offsets(self) -> list[tuple[int, ...]]:
        """Every kernel offset, row-major (the order of a patch's entries)."""
        return list(itertools.product(*(range(k) for k in self.kernel_size)))

    def box(self, *offsets: tuple[int, ...]) -> list[tuple[Size, Size]]:
        """Per axis, the output positions [first, first + count) where every offset is inside."""
        box = []
        for axis, (s, d, p, n, o) in enumerate(
            zip(self.strides, self.dilation, self.before, self.sizes, self.outputs)
        ):
            first: Size = 0
            last: Size = o - 1
            for offset in offsets:
                shift = offset[axis] * d - p
                first = _max(first, -((shift) // s))  # ceil(-shift / s)
                last = _min(last, (n - 1 - shift) // s)
            box.append((first, _max(last - first + 1, 0)))
        return box

    def window(self, offset: tuple[int, ...], box: Sequence[tuple[Size, Size]]) -> tuple:
        """The input slice of `offset` over the output positions of `box`."""
        window = []
        for axis, (first, count) in enumerate(box):
            s = self.strides[axis]
            start = first * s + offset[axis] * self.dilation[axis] - self.before[axis]
            # An empty box gives an empty slice (never a negative stop, which would wrap).
            window.append(slice(start, start + _max(count * s - s + 1, 0), s))
        return tuple(window)


def conv_geometry(layer: Any, inputs: tf.Tensor, outputs: tf.Tensor) -> Geometry:
    """The geometry of a Keras Conv1D/2D/3D (or depthwise, separable) call on `inputs`.

    `inputs` and `outputs` are in the layer's data format. "same" pads as
    TensorFlow does (the smaller half before), "causal" (d·(k - 1) zeros
    before, 1-D).
    """
    rank = len(layer.kernel_size)
    spatial = range(2, rank + 2) if layer.data_format == "channels_first" else range(1, rank + 1)
    sizes = tuple(_dimension(inputs, a) for a in spatial)
    outs = tuple(_dimension(outputs, a) for a in spatial)
    before: list[Size] = []
    for n, o, k, s, d in zip(sizes, outs, layer.kernel_size, layer.strides, layer.dilation_rate):
        span = (k - 1) * d + 1
        if layer.padding == "same":
            before.append(_max((o - 1) * s + span - n, 0) // 2)
        elif layer.padding == "causal":
            before.append(span - 1)
        else:
            before.append(0)
    return Geometry(
        tuple(layer.kernel_size),
        tuple(layer.strides),
        tuple(layer.dilation_rate),
        tuple(before),
        sizes,
        outs,
    )


def patch_moments(
    inputs: tf.Tensor,
    geometry: Geometry,
    weights: tf.Tensor | None = None,
    bias: bool = False,
    groups: int = 1,
    channels_first: bool = False,
) -> tf.Tensor:
    """Σ_{b,t} w ā ā ᵀ over the patches ā of one call, per group: (groups, n, n).

    `inputs` (b, *spatial, C) (or (b, C, *spatial) when `channels_first`);
    `weights` None or one per output position, (b·T,) in row-major order.
    Group j's patch is its C/groups channels at each kernel offset
    (offset-major, then channel, as the kernel reshapes), then a constant
    1 when `bias`: n = offsets·C/groups + bias. Not divided by b.
    """
    dtype = curvature_dtype()
    offsets = geometry.offsets()
    batch = tf.shape(inputs)[0]
    grid = None if weights is None else tf.reshape(weights, [batch, *geometry.outputs])
    blocks: dict[tuple[int, int], tf.Tensor] = {}
    sums: list[tf.Tensor] = []
    last: list[tf.Tensor] = []
    pairs = [(i, j) for i in range(len(offsets)) for j in range(i, len(offsets))]
    for i, j in pairs:
        # The previous pair's product first: then its views are free.
        with tf.control_dependencies(last):
            box = geometry.box(offsets[i], offsets[j])
            left = _view(inputs, geometry, offsets[i], box, groups, channels_first, dtype)
            if grid is not None:
                left = (
                    left
                    * _rows(grid[(slice(None),) + _slices(box)], dtype)[:, tf.newaxis, tf.newaxis]
                )
        with tf.control_dependencies([left]):
            right = _view(inputs, geometry, offsets[j], box, groups, channels_first, dtype)
            product = _group_product(left, right)
        blocks[i, j] = product
        if i == j and bias:
            sums.append(tf.reduce_sum(left, axis=0))  # (groups, C/groups)
        last = [product]
    # Each row of blocks (bias column included) once, then the rows: the
    # factor is copied once, not once more per bias row and column.
    columns = [tf.linalg.matrix_transpose(v[:, :, tf.newaxis]) for v in sums]  # (g, 1, c)
    rows = []
    for i in range(len(offsets)):
        row = [
            blocks[i, j] if j >= i else tf.linalg.matrix_transpose(blocks[j, i])
            for j in range(len(offsets))
        ]
        if bias:
            row.append(sums[i][:, :, tf.newaxis])
        rows.append(tf.concat(row, axis=2) if len(row) > 1 else row[0])
    if bias:
        count = (
            tf.cast(batch * _product(geometry.outputs), dtype)
            if weights is None
            else tf.reduce_sum(tf.cast(weights, dtype))
        )
        rows.append(tf.concat([*columns, tf.fill([groups, 1, 1], count)], axis=2))
    return tf.concat(rows, axis=1) if len(rows) > 1 else rows[0]


def per_example_patch_products(
    inputs: tf.Tensor,
    geometry: Geometry,
    grads: tf.Tensor,
    channels_first: bool = False,
) -> tf.Tensor:
    """Σ_t ā_t g_tᵀ per output column and example: (C, b, offsets·channels, filters).

    `grads` (C, b, *outputs, filters), channels last. One offset's view at
    a time: the patches are never built. Bias rows are not included.
    """
    dtype = curvature_dtype()
    parts: list[tf.Tensor] = []
    for offset in geometry.offsets():
        with tf.control_dependencies(parts[-1:]):
            box = geometry.box(offset)
            view = _view(inputs, geometry, offset, box, 1, channels_first, dtype, flat=False)
            g = grads[(slice(None), slice(None)) + _slices(box)]
            batch, channels = tf.shape(view)[0], view.shape[-1]
            view = tf.reshape(view, [batch, -1, channels])
            g = tf.reshape(g, [tf.shape(g)[0], batch, -1, g.shape[-1]])
            parts.append(tf.einsum("bti,cbto->cbio", view, g))
    return tf.concat(parts, axis=2) if len(parts) > 1 else parts[0]


def _view(
    inputs: tf.Tensor,
    geometry: Geometry,
    offset: tuple[int, ...],
    box: Sequence[tuple[Size, Size]],
    groups: int,
    channels_first: bool,
    dtype: tf.DType,
    flat: bool = True,
) -> tf.Tensor:
    """The view of `offset` over `box`, channels last: (rows, groups, C/groups) or unflattened."""
    window = geometry.window(offset, box)
    if channels_first:
        view = inputs[(slice(None), slice(None)) + window]
        rank = view.shape.rank
        view = tf.transpose(view, [0, *range(2, rank), 1])
    else:
        view = inputs[(slice(None),) + window]
    view = tf.cast(view, dtype)
    if not flat:
        return view
    channels = view.shape[-1]
    return tf.reshape(view, [-1, groups, channels // groups])


def _group_product(left: tf.Tensor, right: tf.Tensor) -> tf.Tensor:
    """Σ_r leftᵀ right per group: (groups, c, c) of two (rows, groups, c) views."""
    if left.shape[1] == 1:
        return tf.matmul(left[:, 0], right[:, 0], transpose_a=True)[tf.newaxis]
    return tf.einsum("rgc,rgd->gcd", left, right)


def _rows(tensor: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    return tf.reshape(tf.cast(tensor, dtype), [-1])


def _slices(box: Sequence[tuple[Size, Size]]) -> tuple[slice, ...]:
    return tuple(slice(first, first + count) for first, count in box)


def _product(sizes: Sequence[Size]) -> Size:
    total: Size = 1
    for size in sizes:
        total = total * size
    return total


def _dimension(tensor: tf.Tensor, axis: int) -> Size:
    static = tensor.shape[axis]
    return static if static is not None else tf.shape(tensor)[axis]


def _max(a: Size, b: Size) -> Size:
    return max(a, b) if isinstance(a, int) and isinstance(b, int) else tf.maximum(a, b)


def _min(a: Size, b: Size) -> Size:
    return min(a, b) if isinstance(a, int) and isinstance(b, int) else tf.minimum(a, b)
