"""Dense layers: a Kronecker block over [kernel; bias], ā = [a, 1] carrying the bias.

What it records is the layer's input and its pre-activation s (the
activation is set aside during the call). Its variables map onto the block
as the (fan_in + 1, units) matrix [kernel; bias]; per-example gradients
are Σ_t ā_t g_tᵀ for each example. On an input of rank ≥ 3 the kernel is
shared over the positions t (sequence steps, pixels): `kron_sharing`
"expand" takes each as one more example, "reduce" averages each example's
inputs and sums its output gradients over them first (Eschenhagen et al.
2023, "Kronecker-Factored Approximate Curvature for Modern Neural Network
Architectures").
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
from kfac_dist.options import EXPAND, KRON_SHARINGS, REDUCE


class DenseBlock(Block):
    """K-FAC for `keras.layers.Dense`: F ≈ A ⊗ G, ā = [a, 1]."""

    def __init__(self, layer: Any, approx: str | None = None, kron_sharing: str = EXPAND):
        self._layer = layer
        variables = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
        super().__init__(layer.name, variables, approx)
        self.kron_sharing = kron_sharing

    @property
    def kron_sharing(self) -> str:
        """ "expand" or "reduce": how the positions of one example enter A and G."""
        return self._kron_sharing

    @kron_sharing.setter
    def kron_sharing(self, value: str) -> None:
        if value not in KRON_SHARINGS:
            raise ValueError(
                f"kron_sharing must be one of {KRON_SHARINGS}, got {value!r} (block '{self.name}')."
            )
        self._kron_sharing = str(value)

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
        """(b·T, fan_in [+ 1]): one row ā per position, example by example."""
        a = rows(tf.cast(record.inputs, curvature_dtype()))
        return with_ones(a) if self.has_bias else a

    def output_rows(self, grads: tf.Tensor) -> tf.Tensor:
        """(C·b·T, units): the output gradients of one record, in the order of `input_rows`."""
        return rows(tf.cast(grads, curvature_dtype()))

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
        """[A, G]: "expand" A = (1/b) Σ_{i,t} w ā āᵀ, G = (1/(b·T)) Σ_{i,t} g gᵀ.

        "reduce": A = (1/b) Σ_i w_i ā_i ā_iᵀ and G = (1/b) Σ_i g_i g_iᵀ with
        ā_i the mean of example i's rows (over the positions its input mask
        keeps) and g_i the sum of its output gradients; each use of the
        layer is one more term.
        """
        if self.kron_sharing == REDUCE:
            return self._reduced_statistics(records, output_grads, batch_size, example_weights)
        inputs = concat_rows([self.input_rows(r) for r in records])
        outputs = concat_rows([self.output_rows(g) for g in output_grads])
        weights = row_weights(records, example_weights, self.input_rows)
        return kron_factors(inputs, outputs, batch_size, weights, self.factor_splits())

    def _reduced_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None,
    ) -> list[tf.Tensor]:
        inputs, outputs, stripped = [], [], []
        for record, grads in zip(records, output_grads):
            batch = tf.shape(record.outputs)[0]
            a = self.input_rows(record)
            # Not [batch, -1, ...]: a replica with no examples cannot infer the -1.
            positions = tf.shape(a)[0] // tf.maximum(batch, 1)
            a = tf.reshape(a, tf.stack([batch, positions, a.shape[-1]]))
            mask = record.extras.get("mask")
            valid = (
                tf.ones(tf.stack([batch, positions]), a.dtype)
                if mask is None
                else tf.reshape(tf.cast(mask, a.dtype), tf.stack([batch, positions]))
            )
            counts = tf.reduce_sum(valid, axis=1, keepdims=True)
            # An example whose every position is padding has ā_i = 0.
            inputs.append(tf.math.divide_no_nan(tf.einsum("btd,bt->bd", a, valid), counts))
            g = self.output_rows(grads)
            columns = tf.shape(grads)[0]
            g = tf.reshape(g, tf.stack([columns, batch, positions, g.shape[-1]]))
            outputs.append(tf.reshape(tf.reduce_sum(g, axis=2), [-1, g.shape[-1]]))
            # The mask is spent on the means: each example is one row, weighted as a whole.
            stripped.append(Record(record.inputs, record.outputs))
        reduced = {id(r): a for r, a in zip(stripped, inputs)}
        weights = row_weights(stripped, example_weights, lambda r: reduced[id(r)])
        return kron_factors(
            concat_rows(inputs), concat_rows(outputs), batch_size, weights, self.factor_splits()
        )

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

    def diagonal_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
    ) -> tf.Tensor:
        """Exact diag(F) = (1/b) Σ_{c,i} ĝ_{c,i}², in the variables' order.

        Without positions (rank-2 inputs, one use) ĝ_{c,i} = ā_i g_{c,i}ᵀ, so
        the diagonal is (ā²)ᵀ (Σ_c g_c²) / b: one matmul the size of the
        forward's, no per-example tensor. With positions (or several uses),
        each example's gradients are summed over them before squaring.
        """
        dtype = curvature_dtype()
        position_free = records[0].inputs.shape.rank == 2 and output_grads[0].shape.rank == 3
        if len(records) != 1 or not position_free:
            per_example = self.per_example_gradients(records, output_grads)
            return tf.reduce_sum(tf.square(per_example), axis=0) / tf.cast(batch_size, dtype)
        a = self.input_rows(records[0])
        g = self.output_rows(output_grads[0])  # (C·b, units), column by column
        squares = tf.reshape(tf.square(g), [tf.shape(output_grads[0])[0], -1, g.shape[-1]])
        matrix = tf.matmul(tf.square(a), tf.reduce_sum(squares, axis=0), transpose_a=True)
        flat = [tf.reshape(v, [-1]) for v in self.split_matrix(matrix)]
        return tf.concat(flat, axis=0) / tf.cast(batch_size, dtype)

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
