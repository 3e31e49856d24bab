"""SeparableConv1D/SeparableConv2D: the depthwise block plus a pointwise (Dense-like) block.

The layer is a depthwise convolution d = W_dw ⋆ x (no bias) followed by a
1×1 convolution s = W_pw d + b, at the same positions. Its block has two
Kronecker parts: the depthwise part ⊕_c A_c ⊗ G_c over each channel's
patches (see `depthwise.py`), and the pointwise part, a Dense block over
the rows [d, 1] at every position. Only x and s are recorded: d is
recomputed by the depthwise convolution (the per-example gradients: from
the patches and the depthwise kernel), and the gradients at
d from those at s, ∂/∂d = W_pw ∂/∂s (the pointwise map is linear and
position-wise), so one record and one output gradient serve both parts.
The two parts are independent blocks of the Fisher (K-FAC's block-diagonal
approximation across layers, here across the layer's two stages).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from kfac_dist.blocks.approximations import KronPart
from kfac_dist.blocks.base import Block
from kfac_dist.blocks.grouped_conv import GroupedPatchBlock, channels_last
from kfac_dist.blocks.records import (
    Record,
    concat_rows,
    kron_factors,
    row_weights,
    rows,
    with_ones,
)
from kfac_dist.linalg import curvature_dtype


class SeparableConvBlock(GroupedPatchBlock):
    """K-FAC for `keras.layers.SeparableConv1D` and `SeparableConv2D`.

    Factors: depthwise_A (C, k, k), depthwise_G (C, M, M), pointwise_A
    (C·M [+1], C·M [+1]) and pointwise_G (F, F); variables in order
    [depthwise_kernel, pointwise_kernel, bias].
    """

    def __init__(self, layer: Any, approx: str | None = None):
        channels, multiplier = (int(d) for d in layer.depthwise_kernel.shape[-2:])
        self._groups = channels
        self._group_inputs = 1
        self._group_outputs = multiplier
        self._layer = layer
        # The grouped (depthwise) part has no bias: the layer's bias follows
        # the pointwise map.
        self._kernel, self._bias = layer.depthwise_kernel, None
        self._pointwise, self._pointwise_bias = layer.pointwise_kernel, layer.bias
        variables = [layer.depthwise_kernel, layer.pointwise_kernel]
        variables += [layer.bias] if layer.bias is not None else []
        Block.__init__(self, layer.name, variables, approx)

    @property
    def pointwise_has_bias(self) -> bool:
        return self._pointwise_bias is not None

    @property
    def depthwise_channels(self) -> int:
        """C·M: the depthwise outputs, the pointwise inputs."""
        return self._groups * self._group_outputs

    def kron_parts(self) -> list[KronPart]:
        k = self.kernel_positions
        n = self.depthwise_channels + int(self.pointwise_has_bias)
        filters = int(self._pointwise.shape[-1])
        return [
            KronPart("depthwise", (k, k), self._group_outputs, self._groups),
            KronPart("pointwise", (n, n), filters),
        ]

    # --- the two stages' rows --------------------------------------------------
    def _depthwise_kernel(self) -> tf.Tensor:
        """(C, k, M): each channel's depthwise kernel, as `group_rows` lays out its patch."""
        return self.kernel_matrices(tf.cast(self._kernel, curvature_dtype()), None)

    def _pointwise_matrix(self) -> tf.Tensor:
        return tf.reshape(
            tf.cast(self._pointwise, curvature_dtype()), [self.depthwise_channels, -1]
        )

    def _stage_rows(self, record: Record) -> tuple[tf.Tensor, tf.Tensor]:
        """Each channel's patches (C, b·T, k) and the pointwise input rows (b·T, C·M [+1])."""
        patches = self.group_rows(self.patch_rows(record))
        d = tf.einsum("cpk,ckm->pcm", patches, self._depthwise_kernel())
        d = tf.reshape(d, [-1, self.depthwise_channels])
        return patches, with_ones(d) if self.pointwise_has_bias else d

    def _gradients(self, grads: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The gradients at s (C'·b·T, F) and at d (C'·b·T, C, M), C' output columns."""
        last = channels_last(self._layer, tf.cast(grads, curvature_dtype()), column_axis=True)
        at_s = tf.reshape(last, [-1, last.shape[-1]])
        at_d = tf.matmul(at_s, self._pointwise_matrix(), transpose_b=True)
        return at_s, tf.reshape(at_d, [-1, self._groups, self._group_outputs])

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        # The depthwise A in chunks of examples' patches (patch_moments.py), the
        # pointwise inputs from the depthwise convolution itself.
        depthwise_a = self.grouped_input_moments(records, example_weights, batch_size, bias=False)
        pointwise = concat_rows([self._depthwise_rows(r) for r in records])
        gradients = [self._gradients(g) for g in output_grads]
        at_s = tf.concat([s for s, _ in gradients], axis=0)
        at_d = tf.concat([d for _, d in gradients], axis=0)
        weights = row_weights(records, example_weights, self.position_rows)
        positions = tf.cast(tf.shape(pointwise)[0], at_d.dtype)
        depthwise_g = tf.einsum("rgi,rgj->gij", at_d, at_d) / positions
        return [depthwise_a, depthwise_g, *kron_factors(pointwise, at_s, batch_size, weights)]

    def _depthwise_rows(self, record: Record) -> tf.Tensor:
        """(b·T, C·M [+1]): the depthwise stage's outputs, the pointwise map's input rows."""
        layer = self._layer
        d = keras.ops.depthwise_conv(
            record.inputs,
            self._kernel,
            strides=layer.strides,
            padding=layer.padding,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
        )
        d = rows(channels_last(layer, tf.cast(d, curvature_dtype())))
        return with_ones(d) if self.pointwise_has_bias else d

    def gradient_matrices(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        pointwise = tf.reshape(grads[1], [self.depthwise_channels, -1])
        if self.pointwise_has_bias:
            pointwise = tf.concat([pointwise, tf.reshape(grads[2], [1, -1])], axis=0)
        return [self.kernel_matrices(grads[0], None), pointwise]

    def split_matrices(self, matrices: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        (depthwise,) = self.split_kernel_matrices(matrices[0], bias=False)
        pointwise = matrices[1]
        if not self.pointwise_has_bias:
            return [depthwise, tf.reshape(pointwise, self._pointwise.shape)]
        kernel, bias = pointwise[:-1], pointwise[-1]
        return [depthwise, tf.reshape(kernel, self._pointwise.shape), bias]

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        per_record = []
        for record, grads in zip(records, output_grads):
            batch = tf.shape(record.outputs)[0]
            columns = tf.shape(grads)[0]
            patches, pointwise = self._stage_rows(record)
            at_s, at_d = self._gradients(grads)
            patches = tf.reshape(patches, [self._groups, batch, -1, patches.shape[-1]])
            pointwise = tf.reshape(pointwise, [batch, -1, pointwise.shape[-1]])
            at_s = tf.reshape(at_s, [columns, batch, -1, at_s.shape[-1]])
            at_d = tf.reshape(at_d, [columns, batch, -1, self._groups, self._group_outputs])
            # Σ_t of each stage's ā_t g_tᵀ per column and example, flattened
            # as the variables are: the depthwise kernel (k, C, M), then the
            # pointwise kernel's rows and the bias row.
            depthwise = tf.einsum("gbti,cbtgo->cbigo", patches, at_d)
            outer = tf.einsum("bti,cbto->cbio", pointwise, at_s)
            lead = tf.shape(outer)[:2]
            per_record.append(
                tf.concat(
                    [
                        tf.reshape(depthwise, tf.concat([lead, [-1]], 0)),
                        tf.reshape(outer, tf.concat([lead, [-1]], 0)),
                    ],
                    axis=-1,
                )
            )
        return tf.reshape(tf.add_n(per_record), [-1, self.num_params])
