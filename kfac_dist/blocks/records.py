"""What a layer's forward pass leaves behind, and the rows and Kronecker factors made of it.

Scaling convention: `output_grads` (one per record, with a leading axis of
C output columns) are gradients of the pseudo-loss Σ⟨u, η⟩ whose
output-space covariance is (local batch size) × the Hessian of the compiled
loss, so that the GGN of the loss is (1/b) Σ_i E[ĝ_i ĝ_iᵀ] with ĝ_i example
i's parameter gradient. Kronecker blocks take every position of an example
(sequence step, image patch, use of a shared layer) as one more term:
A = (1/b) Σ_{i,t} ā āᵀ and G = (1/(b·T)) Σ_{i,t} g gᵀ, which is exact for a
linear layer under MSE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import tensorflow as tf
from keras.src.backend import get_keras_mask

from kfac_dist.linalg import Split, curvature_dtype, split_rows


@dataclasses.dataclass
class Record:
    """What one use of a layer left behind in the forward pass."""

    inputs: tf.Tensor
    outputs: tf.Tensor  # pre-activation s: the tensor gradients are taken at
    extras: dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)


def rows(tensor: tf.Tensor) -> tf.Tensor:
    """Flattens every axis but the last: each position becomes one row."""
    return tf.reshape(tensor, [-1, tensor.shape[-1]])


def with_ones(rows_: tf.Tensor) -> tf.Tensor:
    """Appends the constant input 1 that carries the bias."""
    return tf.pad(rows_, [[0, 0], [0, 1]], constant_values=1)


def concat_rows(parts: Sequence[tf.Tensor]) -> tf.Tensor:
    """The rows of every record (one record, the common case, adds no op)."""
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


def input_mask(inputs: tf.Tensor) -> dict[str, tf.Tensor]:
    """The Keras mask an input carries (one entry per position), as Record extras."""
    mask = get_keras_mask(inputs)
    if mask is None or mask.shape.rank != inputs.shape.rank - 1:
        return {}
    return {"mask": mask}


def row_weights(
    records: Sequence[Record],
    example_weights: tf.Tensor | None,
    rows_of: Callable[[Record], tf.Tensor],
) -> tf.Tensor | None:
    """Each row's weight, in the order rows are concatenated (None: all ones).

    `example_weights` are the loss's weights: (b,) per example, or (b, *S)
    per loss position (per-step sample weights, a Keras mask). A record with
    as many rows per example as there are loss positions takes them position
    by position; any other record takes each example's mean weight. A Keras
    mask on the record's input (`extras["mask"]`) zeroes its padded rows, so
    padding never enters the input factor.
    """
    masks = [record.extras.get("mask") for record in records]
    if example_weights is None and all(m is None for m in masks):
        return None
    parts = []
    for record, mask in zip(records, masks):
        count = tf.shape(rows_of(record))[0]
        if example_weights is None:
            weights = tf.ones([count], curvature_dtype())
        else:
            weights = _weights_per_row(tf.cast(example_weights, curvature_dtype()), count)
        if mask is not None:
            weights = weights * tf.reshape(tf.cast(mask, weights.dtype), [-1])
        parts.append(weights)
    return concat_rows(parts)


def _weights_per_row(weights: tf.Tensor, count: tf.Tensor) -> tf.Tensor:
    batch = tf.shape(weights)[0]
    per_example = tf.math.floordiv(count, tf.maximum(batch, 1))
    # Not [batch, -1]: a replica with no examples cannot infer the -1.
    means = tf.reshape(weights, tf.stack([batch, tf.size(weights) // tf.maximum(batch, 1)]))
    repeated = tf.repeat(tf.reduce_mean(means, axis=1), per_example)
    if weights.shape.rank < 2:
        return repeated
    aligned = tf.equal(tf.shape(means)[1], per_example)
    return tf.cond(aligned, lambda: tf.reshape(means, [-1]), lambda: repeated)


def kron_factors(
    input_rows: tf.Tensor,
    output_rows: tf.Tensor,
    batch_size: tf.Tensor | int,
    weights: tf.Tensor | None = None,
    splits: Sequence[Split | None] = (None, None),
) -> list[tf.Tensor]:
    """A = (1/b) Σ w ā āᵀ and G = (1/(b·T)) Σ g gᵀ (w = 1 without sample weights).

    `input_rows` holds the b·T positions of the local batch; `output_rows`
    the gradients at those positions for each output column (C·b·T rows,
    C = 1 unless the Fisher is summed over output columns exactly).
    `splits` (A's, G's; see `linalg.split_of`): a split factor is computed
    as its (k, m, m) diagonal blocks only, k times cheaper than the whole.
    """
    input_split, output_split = splits
    b = tf.cast(batch_size, input_rows.dtype)
    positions = input_rows.shape[0]  # static when the batch is (no shape op)
    if positions is None:
        positions = tf.cast(tf.shape(input_rows)[0], input_rows.dtype)
    weighted = input_rows if weights is None else input_rows * weights[:, tf.newaxis]
    a = _second_moment(input_rows, weighted, input_split) / b
    g = _second_moment(output_rows, output_rows, output_split) / positions
    return [a, g]


def _second_moment(rows: tf.Tensor, weighted: tf.Tensor, split: Split | None) -> tf.Tensor:
    """rowsᵀ weighted, or its (k, m, m) diagonal blocks for a split factor."""
    if split is None:
        return tf.matmul(rows, weighted, transpose_a=True)
    return tf.einsum("rka,rkb->kab", split_rows(rows, split), split_rows(weighted, split))
