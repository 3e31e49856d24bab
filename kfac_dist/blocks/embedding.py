"""Embedding layers: a Kronecker block with a diagonal input factor.

The input of an embedding is a one-hot token, so A = E[Σ_t ā ā ᵀ] is diagonal:
the token counts over the batch (divided by b). G is full, as for Dense.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.base import KRON, Block
from kfac_dist.blocks.records import Record, kron_factors, row_weights, rows
from kfac_dist.linalg import curvature_dtype


class EmbeddingBlock(Block):
    """K-FAC for `keras.layers.Embedding`: diag(token counts) ⊗ G."""

    approximations = (KRON,)

    def __init__(self, layer: Any, approx: str | None = None):
        self._layer = layer
        super().__init__(layer.name, [layer.embeddings], approx)

    @property
    def layer(self) -> Any:
        return self._layer

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        outputs = call(inputs, *args, **kwargs)
        return outputs, Record(inputs=inputs, outputs=outputs)

    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        vocabulary, width = self.variables[0].shape
        return (int(vocabulary),), int(width)

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        vocabulary = self.kron_dims()[0][0]
        ids = tf.concat([tf.reshape(tf.cast(r.inputs, tf.int32), [-1]) for r in records], 0)
        weights = row_weights(records, example_weights, lambda r: tf.reshape(r.inputs, [-1]))
        if weights is None:
            weights = tf.ones_like(ids, curvature_dtype())
        counts = tf.math.unsorted_segment_sum(weights, ids, vocabulary)
        outputs = tf.concat([rows(tf.cast(g, curvature_dtype())) for g in output_grads], axis=0)
        # kron_factors on one-hot rows would materialise (b·T, V): use counts.
        _, g = kron_factors(tf.zeros([tf.shape(ids)[0], 0], curvature_dtype()), outputs, batch_size)
        return [counts / tf.cast(batch_size, curvature_dtype()), g]

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.convert_to_tensor(grads[0])

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        return [matrix]
