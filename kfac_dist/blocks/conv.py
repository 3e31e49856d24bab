"""Conv1D/Conv2D layers: KFC (Grosse & Martens 2016), a Dense block over patches.

Ω = E[Σ_t ā_t ā_tᵀ] over the image patches ā_t the kernel sees (its size,
strides, dilation and padding, bias as a constant 1) and
Γ = E[Σ_t g_t g_tᵀ]/|T| over the |T| output locations — the Dense block's
factors once each patch is a row, so a 1×1 convolution equals a Dense layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.dense import DenseBlock
from kfac_dist.blocks.records import Record, rows, with_ones
from kfac_dist.linalg import curvature_dtype


class ConvBlock(DenseBlock):
    """K-FAC for `keras.layers.Conv1D` and `Conv2D` (groups=1)."""

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
        patches = extract_patches(self._layer, tf.cast(record.inputs, curvature_dtype()))
        a = rows(patches)
        return with_ones(a) if self.has_bias else a

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        output_grads = [_channels_last(self._layer, g, column_axis=True) for g in output_grads]
        return super().kron_statistics(records, output_grads, batch_size, example_weights)

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        output_grads = [_channels_last(self._layer, g, column_axis=True) for g in output_grads]
        records = [
            Record(r.inputs, _channels_last(self._layer, r.outputs), r.extras) for r in records
        ]
        return super().per_example_gradients(records, output_grads)


def _channels_last(layer: Any, tensor: tf.Tensor, column_axis: bool = False) -> tf.Tensor:
    if layer.data_format != "channels_first":
        return tensor
    rank = tensor.shape.rank
    lead = 2 if column_axis else 1
    perm = list(range(lead)) + list(range(lead + 1, rank)) + [lead]
    return tf.transpose(tensor, perm)


def extract_patches(layer: Any, inputs: tf.Tensor) -> tf.Tensor:
    """(b, *output_positions, kernel_size·channels) patches, as the layer sees them.

    The patch layout (row, column, channel) matches the kernel reshaped to
    (kernel_size·channels, filters).
    """
    inputs = _channels_last(layer, inputs)
    kernel_size, strides, dilation = (
        layer.kernel_size,
        layer.strides,
        layer.dilation_rate,
    )
    padding = layer.padding
    if len(kernel_size) == 1:
        if padding == "causal":
            left = dilation[0] * (kernel_size[0] - 1)
            inputs = tf.pad(inputs, [[0, 0], [left, 0], [0, 0]])
            padding = "valid"
        inputs = inputs[:, tf.newaxis]
        kernel_size, strides, dilation = (
            (1, *kernel_size),
            (1, *strides),
            (1, *dilation),
        )
    patches = tf.image.extract_patches(
        inputs,
        sizes=[1, *kernel_size, 1],
        strides=[1, *strides, 1],
        rates=[1, *dilation, 1],
        padding=padding.upper(),
    )
    if len(layer.kernel_size) == 1:
        patches = patches[:, 0]
    return patches
