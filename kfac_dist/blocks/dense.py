"""Dense layers: a Kronecker block over [kernel; bias], ā = [a, 1] carrying the bias.

What it records is the layer's input and its pre-activation s (the
activation is set aside during the call). Its variables map onto the block
as the (fan_in + 1, units) matrix [kernel; bias]; per-example gradients
are Σ_t ā_t g_tᵀ for each example.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kfac_dist.blocks.base import Block
from kfac_dist.blocks.records import (
    Record,
    concat_rows,
    input_mask,
    kron_factors,
    row_weights,
    rows,
    with_ones,
)
from kfac_dist.linalg import curvature_dtype


class DenseBlock(Block):
    """K-FAC for `keras.layers.Dense`: F ≈ A ⊗ G, ā = [a, 1]."""

    def __init__(self, layer: Any, approx: str | None = None):
        self._layer = layer
        variables = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
        super().__init__(layer.name, variables, approx)

    @property
    def layer(self) -> Any:
        return self._layer

    @property
    def has_bias(self) -> bool:
        return len(self.variables) == 2

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        # Keras applies the activation inside `call`: set it aside so that the
        # recorded output is the pre-activation s, then apply it to s.
        activation = self._layer.activation
        self._layer.activation = None
        try:
            s = call(inputs, *args, **kwargs)
        finally:
            self._layer.activation = activation
        outputs = activation(s) if activation is not None else s
        return outputs, Record(inputs=inputs, outputs=s, extras=input_mask(inputs))

    # --- the linear map seen as rows of (input, output) pairs ----------------
    def input_rows(self, record: Record) -> tf.Tensor:
        a = rows(tf.cast(record.inputs, curvature_dtype()))
        return with_ones(a) if self.has_bias else a

    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        kernel = self.variables[0]
        fan_in = int(np.prod(kernel.shape[:-1])) + int(self.has_bias)
        return (fan_in, fan_in), int(kernel.shape[-1])

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        inputs = concat_rows([self.input_rows(r) for r in records])
        outputs = concat_rows([rows(tf.cast(g, curvature_dtype())) for g in output_grads])
        weights = row_weights(records, example_weights, self.input_rows)
        return kron_factors(inputs, outputs, batch_size, weights)

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        per_record = []
        for record, grads in zip(records, output_grads):
            inputs = self.input_rows(record)
            batch = tf.shape(record.outputs)[0]
            inputs = tf.reshape(inputs, [batch, -1, inputs.shape[-1]])
            columns = tf.shape(grads)[0]
            outs = tf.reshape(
                tf.cast(grads, curvature_dtype()), [columns, batch, -1, grads.shape[-1]]
            )
            # Σ_t ā_t g_tᵀ for each column and example, flattened row-major:
            # the kernel rows first, then the bias row, as the variables are.
            per_record.append(tf.einsum("bti,cbto->cbio", inputs, outs))
        total = tf.add_n(per_record)
        return tf.reshape(total, [-1, total.shape[-2] * total.shape[-1]])

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        kernel = tf.reshape(grads[0], [-1, grads[0].shape[-1]])
        if not self.has_bias:
            return kernel
        return tf.concat([kernel, tf.reshape(grads[1], [1, -1])], axis=0)

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        kernel_shape = self.variables[0].shape
        if not self.has_bias:
            return [tf.reshape(matrix, kernel_shape)]
        kernel, bias = tf.split(matrix, [matrix.shape[0] - 1, 1])
        return [tf.reshape(kernel, kernel_shape), tf.reshape(bias, [-1])]
