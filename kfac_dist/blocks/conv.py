"""Conv1D/Conv2D/Conv3D layers: KFC (Grosse & Martens 2016), a Dense block over patches.

Ω = E[Σ_t ā_t ā_tᵀ] over the image patches ā_t the kernel sees (its size,
strides, dilation and padding, bias as a constant 1) and
Γ = E[Σ_t g_t g_tᵀ]/|T| over the |T| output locations — the Dense block's
factors once each patch is a row, so a 1×1 convolution equals a Dense layer.
Ω is computed from the patches of a few examples at a time (`patch_moments`)
and the per-example gradients from shifted views of the input, never from
the whole batch's patches; under fisher_approx="diagonal" the diagonal is
the signed-gradient estimate (`blocks/diagonal.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.dense import DenseBlock
from kfac_dist.blocks.diagonal import signed_gradient_diagonal
from kfac_dist.blocks.patch_moments import (
    Geometry,
    conv_geometry,
    patch_moments,
    patches_of,
    per_example_patch_products,
)
from kfac_dist.blocks.records import Record, row_weights, rows, with_ones
from kfac_dist.linalg import curvature_dtype


class ConvBlock(DenseBlock):
    """K-FAC for `keras.layers.Conv1D`, `Conv2D` and `Conv3D` (groups=1)."""

    def __init__(self, layer: Any, approx: str | None = None):
        if getattr(layer, "groups", 1) != 1:
            raise ValueError(
                f"Layer '{layer.name}' is a grouped convolution (groups={layer.groups}), "
                "which K-FAC's conv block does not cover; register it with "
                "LayerCollection.register_generic(...) or pass unsupported_layers='diagonal'."
            )
        super().__init__(layer, approx)

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        # Patch rows are output positions, not input positions: an input mask
        # does not line up with them (Keras convolutions do not take masks).
        outputs, record = super().record(call, inputs, *args, **kwargs)
        record.extras.pop("mask", None)
        return outputs, record

    def input_rows(self, record: Record) -> tf.Tensor:
        """(b·T, kernel_size·channels [+ 1]) patch rows; the statistics never build them."""
        patches = extract_patches(self._layer, tf.cast(record.inputs, curvature_dtype()))
        a = rows(patches)
        return with_ones(a) if self.has_bias else a

    # --- the patches' moments, in chunks of examples (patch_moments.py)
    def view_source(self, record: Record) -> tuple[tf.Tensor, Geometry, bool]:
        """The tensor the kernel offsets' views are sliced from, its geometry, channels first."""
        geometry = conv_geometry(self._layer, record.inputs, record.outputs)
        return record.inputs, geometry, self._layer.data_format == "channels_first"

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """[A, G] as the Dense block's over the patch rows, A without building a patch."""
        moments, positions = [], []
        for record in records:
            inputs, geometry, channels_first = self.view_source(record)
            weights = row_weights([record], example_weights, self._output_rows_of)
            moments.append(
                patch_moments(inputs, geometry, weights, self.has_bias, 1, channels_first)[0]
            )
            positions.append(tf.shape(self._output_rows_of(record))[0])
        dtype = curvature_dtype()
        a = tf.add_n(moments) / tf.cast(batch_size, dtype)
        last = [channels_last(self._layer, g, column_axis=True) for g in output_grads]
        g_rows = tf.concat([self.output_rows(g) for g in last], axis=0)
        g = tf.matmul(g_rows, g_rows, transpose_a=True) / tf.cast(tf.add_n(positions), dtype)
        return [a, g]

    def diagonal_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
    ) -> tf.Tensor:
        """diag(F) estimated from the signed batch gradient (`signed_gradient_diagonal`).

        The exact diagonal needs each example's gradient Σ_t ā_t g_tᵀ, b times
        the parameters (and on CPU many times the layer's backward pass); the
        estimate costs one forward and one weight-gradient pass.
        """
        return signed_gradient_diagonal(self, records, output_grads, batch_size)

    def _output_rows_of(self, record: Record) -> tf.Tensor:
        """(b·T, filters): one row per output position, as the patch rows (a reshape, no copy)."""
        return rows(channels_last(self._layer, record.outputs))

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        """Σ_t ā_t g_tᵀ per column and example, one kernel offset's view at a time."""
        per_record = []
        for record, grads in zip(records, output_grads):
            inputs, geometry, channels_first = self.view_source(record)
            g = tf.cast(channels_last(self._layer, grads, column_axis=True), curvature_dtype())
            parts = [per_example_patch_products(inputs, geometry, g, channels_first)]
            if self.has_bias:
                lead = tf.shape(g)[:2]
                sums = tf.reduce_sum(tf.reshape(g, tf.concat([lead, [-1, g.shape[-1]]], 0)), 2)
                parts.append(sums[:, :, tf.newaxis])
            per_record.append(tf.concat(parts, axis=2) if len(parts) > 1 else parts[0])
        total = tf.add_n(per_record)
        return tf.reshape(total, [-1, total.shape[-2] * total.shape[-1]])


def channels_last(layer: Any, tensor: tf.Tensor, column_axis: bool = False) -> tf.Tensor:
    if layer.data_format != "channels_first":
        return tensor
    rank = tensor.shape.rank
    lead = 2 if column_axis else 1
    perm = list(range(lead)) + list(range(lead + 1, rank)) + [lead]
    return tf.transpose(tensor, perm)


def extract_patches(layer: Any, inputs: tf.Tensor) -> tf.Tensor:
    """(b, *output_positions, kernel_size·channels) patches, as the layer sees them.

    The patch layout (kernel entries row-major, then channel) matches the
    kernel reshaped to (kernel_size·channels, filters).
    """
    inputs = channels_last(layer, inputs)
    padding = layer.padding
    if padding == "causal":
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    return patches_of(inputs, layer.kernel_size, layer.strides, layer.dilation_rate, padding)


def dimension(tensor: tf.Tensor, axis: int) -> Any:
    """A dimension: the static int where known, else a scalar tensor."""
    static = tensor.shape[axis]
    return static if static is not None else tf.shape(tensor)[axis]
