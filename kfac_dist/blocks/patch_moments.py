"""Convolution patch moments without the batch's patches: shifted views, or chunks of examples.

A convolution's patch at output position t holds, for each kernel offset i,
the input seen at offset i: x[t·s + i·d - p] (zero outside the input). The
input factor is Σ_t w_t ā_t ā_tᵀ over every patch of the batch, PᵀP of the
patch rows P, which are offsets × (output / input positions) times the
input (9× for a 3×3 "same" convolution). Neither way below builds P:

- `moments_from_views`: the view X_i of offset i, that input at every
  output position, is a slice of the input, no larger than it; block (i, j)
  of the factor is Σ_t w_t X_i[t] X_j[t]ᵀ, and only the k(k+1)/2 blocks
  j ≥ i are computed (half of PᵀP's flops), each over the output box where
  both offsets meet the input (no padded copy).
- `moments_from_chunks`: the patches of a few examples at a time, at most
  the input's size (`examples_per_chunk`), one matmul each, added in a while
  loop. For a strided convolution the views are strided slices, copies that
  cost far more than the products (measured in one K-FAC step of a stride-2
  Conv2D, 16 → 32 channels at 28×28, batch 64: 299 ms against 36 ms), so
  `patch_moments` uses the chunks there and the views at stride 1, where
  they are faster (1.5× and 1.6× in a step at 64 and 256 channels).

`per_example_patch_products` is Σ_t X_i[t] g_tᵀ per example from the views,
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

    Shifted views (`moments_from_views`) for a convolution of stride 1,
    chunks of patches (`moments_from_chunks`) for a strided one, whose
    views are strided slices: copies that took 299 ms against the chunks'
    36 ms in one K-FAC step of a stride-2 conv (BENCHMARKS.md).
    """
    strided = any(s != 1 for s in geometry.strides)
    method = moments_from_chunks if strided else moments_from_views
    return method(inputs, geometry, weights, bias, groups, channels_first)


def moments_from_views(
    inputs: tf.Tensor,
    geometry: Geometry,
    weights: tf.Tensor | None = None,
    bias: bool = False,
    groups: int = 1,
    channels_first: bool = False,
) -> tf.Tensor:
    """`patch_moments` from the k(k+1)/2 products of two shifted views, j ≥ i.

    Each pair's slices are made after the previous pair's product (control
    dependencies), so a graph never holds more than the two views of one
    pair (plus a transient copy when a view is cast, weighted or transposed
    from channels-first).
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


def moments_from_chunks(
    inputs: tf.Tensor,
    geometry: Geometry,
    weights: tf.Tensor | None = None,
    bias: bool = False,
    groups: int = 1,
    channels_first: bool = False,
) -> tf.Tensor:
    """`patch_moments` from the patches of a few examples at a time, one matmul each.

    The examples go through in chunks (`examples_per_chunk`), one chunk
    after the other (a while loop, static shapes: the last chunk's missing
    examples are zeros).
    """
    dtype = curvature_dtype()
    batch = tf.shape(inputs)[0]
    chunk = examples_per_chunk(geometry, _dimension(inputs, 0), weighted=weights is not None)
    grid = None if weights is None else tf.reshape(weights, [batch, -1])
    channels = inputs.shape[1 if channels_first else -1]
    offsets = len(geometry.offsets())
    size = offsets * (channels // groups)

    def add_chunk(
        start: tf.Tensor, moments: tf.Tensor, sums: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        index = start + tf.range(chunk)
        present = tf.cast(index < batch, dtype)
        index = tf.minimum(index, batch - 1)
        x = tf.cast(tf.gather(inputs, index), dtype)
        x = x * tf.reshape(present, [-1] + [1] * (x.shape.rank - 1))
        if channels_first:
            x = tf.transpose(x, [0, *range(2, x.shape.rank), 1])
        rows = _group_rows(_patches(x, geometry), offsets, groups)  # (groups, rows, n)
        weighted = rows
        if grid is not None:
            row_weights = tf.cast(tf.gather(grid, index), dtype) * present[:, tf.newaxis]
            weighted = rows * tf.reshape(row_weights, [1, -1, 1])
        if bias:
            sums += tf.reduce_sum(weighted, axis=1)
        return start + chunk, moments + tf.matmul(weighted, rows, transpose_a=True), sums

    _, moments, sums = tf.while_loop(
        lambda start, *_: start < batch,
        add_chunk,
        [tf.constant(0), tf.zeros([groups, size, size], dtype), tf.zeros([groups, size], dtype)],
        parallel_iterations=1,
    )
    if not bias:
        return moments
    count = (
        tf.cast(batch * _product(geometry.outputs), dtype)
        if weights is None
        else tf.reduce_sum(tf.cast(weights, dtype))
    )
    top = tf.concat([moments, sums[:, :, tf.newaxis]], axis=2)
    corner = tf.concat([sums[:, tf.newaxis], tf.fill([groups, 1, 1], count)], axis=2)
    return tf.concat([top, corner], axis=1)


def examples_per_chunk(geometry: Geometry, batch: Size, weighted: bool = False) -> Size:
    """How many examples' patches fit in the input's size (half of it when `weighted`).

    An example's patches are offsets × (output / input positions) times its
    input (9× for a 3×3 "same" convolution), so a chunk of this many
    examples holds at most the batch's input in patches, and with the
    weighted copy of them at most that again. At least one example: below
    offsets·T/S examples (9 for a 3×3 "same" convolution) a chunk is one
    example's patches, more than the input.
    """
    per_example = len(geometry.offsets()) * _product(geometry.outputs) * (2 if weighted else 1)
    fit = (batch * _product(geometry.sizes)) // per_example
    return _min(_max(fit, 1), _max(batch, 1))


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


def patches_of(
    inputs: tf.Tensor,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    padding: str,
) -> tf.Tensor:
    """Patches of a channels-last (b, *spatial, channels) input with 1 to 3 spatial axes.

    Padding is "valid" or "same" with TensorFlow's rule (the smaller half
    before). Returns (b, *output_positions, prod(kernel_size)·channels).
    """
    rank = len(kernel_size)
    if rank == 1:
        # A 1-D input is a one-row image: the 2-D op covers it.
        two_d = patches_of(
            inputs[:, tf.newaxis],
            (1, *kernel_size),
            (1, *strides),
            (1, *dilation),
            padding,
        )
        return two_d[:, 0]
    if rank == 2:
        return tf.image.extract_patches(
            inputs,
            sizes=[1, *kernel_size, 1],
            strides=[1, *strides, 1],
            rates=[1, *dilation, 1],
            padding=padding.upper(),
        )
    if rank == 3 and all(d == 1 for d in dilation):
        return tf.extract_volume_patches(
            inputs,
            ksizes=[1, *kernel_size, 1],
            strides=[1, *strides, 1],
            padding=padding.upper(),
        )
    if rank == 3:
        # tf.extract_volume_patches has no dilation.
        return _sliced_patches(inputs, kernel_size, strides, dilation, padding)
    raise ValueError(f"Convolution patches cover 1 to 3 spatial axes, got kernel {kernel_size}.")


def _sliced_patches(
    inputs: tf.Tensor,
    kernel_size: Sequence[int],
    strides: Sequence[int],
    dilation: Sequence[int],
    padding: str,
) -> tf.Tensor:
    """Patches as one strided slice per kernel entry, concatenated channel-wise.

    The result is as large as the op's (no patch of the span is ever built);
    the entries come in row-major kernel order, then channel.
    """
    spans = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
    sizes = [_dimension(inputs, axis) for axis in range(1, len(kernel_size) + 1)]
    if padding.lower() == "same":
        pads = [[0, 0]]
        for size, span, stride in zip(sizes, spans, strides):
            out = -(-size // stride)
            total = _max(0, (out - 1) * stride + span - size)
            pads.append([total // 2, total - total // 2])
        inputs = tf.pad(inputs, [*pads, [0, 0]])
        sizes = [size + before + after for size, (before, after) in zip(sizes, pads[1:])]
    outs = [(size - span) // stride + 1 for size, span, stride in zip(sizes, spans, strides)]
    slices = []
    for entry in itertools.product(*(range(k) for k in kernel_size)):
        window = tuple(
            slice(k * d, k * d + (out - 1) * s + 1, s)
            for k, d, s, out in zip(entry, dilation, strides, outs)
        )
        slices.append(inputs[(slice(None),) + window])
    return tf.concat(slices, axis=-1)


def _patches(x: tf.Tensor, geometry: Geometry) -> tf.Tensor:
    """(b, T, offsets·C) patches of a channels-last input under `geometry`, zero outside it."""
    pads = [[0, 0]]
    for k, s, d, before, n, o in zip(
        geometry.kernel_size,
        geometry.strides,
        geometry.dilation,
        geometry.before,
        geometry.sizes,
        geometry.outputs,
    ):
        pads.append([before, _max((o - 1) * s + (k - 1) * d + 1 - before - n, 0)])
    padded = tf.pad(x, [*pads, [0, 0]])
    patches = patches_of(padded, geometry.kernel_size, geometry.strides, geometry.dilation, "valid")
    patches = patches[(slice(None),) + tuple(slice(0, o) for o in geometry.outputs)]
    return tf.reshape(patches, [tf.shape(patches)[0], -1, patches.shape[-1]])


def _group_rows(patches: tf.Tensor, offsets: int, groups: int) -> tf.Tensor:
    """(groups, rows, offsets·C/groups): each group's patch rows, offset-major."""
    width = patches.shape[-1]
    if groups == 1:
        return tf.reshape(patches, [1, -1, width])
    grouped = tf.reshape(patches, [-1, offsets, groups, width // (offsets * groups)])
    return tf.reshape(tf.transpose(grouped, [2, 0, 1, 3]), [groups, -1, width // groups])


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
