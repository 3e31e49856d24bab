"""The curvature block: what every block kind answers, and the shared math.

A block is a group of variables preconditioned together. Every block answers
the same questions: which factors it keeps (`factor_shapes`), their batch
statistics from what the forward and backward passes recorded
(`statistics`), the inverse (or eigendecomposition) of one factor for a
damping (`invert`), and how to precondition its gradients (`precondition`).

Scaling convention (DESIGN.md §4): `output_grads` (one per record, with a
leading axis of C output columns) are gradients of the
pseudo-loss Σ⟨u, η⟩ whose output-space covariance is (local batch size) ×
the Hessian of the compiled loss, so that the GGN of the loss is
(1/b) Σ_i E[ĝ_i ĝ_iᵀ] with ĝ_i example i's parameter gradient. Kronecker
blocks take every position of an example (sequence step, image patch, use of
a shared layer) as one more term: A = (1/b) Σ_{i,t} ā ā ᵀ and
G = (1/(b·T)) Σ_{i,t} g gᵀ, which is exact for a linear layer under MSE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
from keras.src.backend import get_keras_mask

from kfac_dist import grouping, linalg
from kfac_dist.linalg import curvature_dtype
from kfac_dist.options import (  # noqa: F401  (the block kinds' vocabulary)
    APPROXIMATIONS,
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    INVERSE_METHODS,
    KRON,
)


@dataclasses.dataclass
class Record:
    """What one use of a layer left behind in the forward pass."""

    inputs: tf.Tensor
    outputs: tf.Tensor  # pre-activation s: the tensor gradients are taken at
    extras: dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)


class Block:
    """A group of variables with one curvature approximation."""

    #: approximations this block kind supports, the first is the default.
    approximations: tuple[str, ...] = (KRON, DIAGONAL, FULL)

    def __init__(self, name: str, variables: Sequence, approx: str | None = None):
        self.name = name
        self.variables = list(variables)
        self.approx = approx or self.approximations[0]
        if self.approx not in self.approximations:
            raise ValueError(
                f"fisher_approx={self.approx!r} is not available for block "
                f"'{name}' ({type(self).__name__}); it supports {self.approximations}."
            )

    # --- what a block kind defines ---------------------------------------
    @property
    def layer(self):
        """The Keras layer whose calls this block records, or None."""
        return None

    def record(self, call, inputs, *args, **kwargs):
        """Calls the layer, returns (output, Record); only for layer blocks."""
        raise NotImplementedError

    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        """Shapes of the Kronecker factors: (input factor shape, output dim)."""
        raise NotImplementedError

    def kron_statistics(
        self, records, output_grads, batch_size, example_weights=None
    ) -> list[tf.Tensor]:
        raise NotImplementedError

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        """The block's gradients as one (input side, output side) matrix."""
        raise NotImplementedError

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of `gradient_matrix`: one tensor per variable."""
        raise NotImplementedError

    def per_example_gradients(self, records, output_grads) -> tf.Tensor:
        """(C·b, num_params): each example's gradients per output column, variables in order."""
        raise NotImplementedError

    # --- shared machinery ------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.variables)

    def factor_shapes(self) -> list[tuple[int, ...]]:
        if self.approx == KRON:
            input_shape, output_dim = self.kron_dims()
            return [input_shape, (output_dim, output_dim)]
        if self.approx == DIAGONAL:
            return [(self.num_params,)]
        return [(self.num_params, self.num_params)]

    def factor_names(self) -> list[str]:
        return ["A", "G"] if self.approx == KRON else [self.approx]

    def statistics(
        self, records, output_grads, batch_size, example_weights=None
    ) -> list[tf.Tensor]:
        """Batch statistics of each factor (means over the local batch).

        `example_weights` (b,), the sample weights, weight a Kronecker block's
        input factor: Σ_i w_i ā ā ᵀ / b (the curvature divides it by the mean
        weight; the output side carries w through the pseudo-loss). Per-example
        statistics carry w through the pseudo-loss alone.
        """
        if self.approx == KRON:
            return self.kron_statistics(records, output_grads, batch_size, example_weights)
        per_example = self.per_example_gradients(records, output_grads)
        b = tf.cast(batch_size, per_example.dtype)
        if self.approx == DIAGONAL:
            return [tf.reduce_sum(tf.square(per_example), axis=0) / b]
        return [tf.matmul(per_example, per_example, transpose_a=True) / b]

    def invert(self, index: int, factors: Sequence[tf.Tensor], damping, method: str):
        """Payload of factor `index`: its damped inverse, or (eigenvalues, eigenvectors).

        Returns (payload tensors, retries); see `invert_factors`.
        """
        means = tf.stack([linalg.mean_eigenvalue(f) for f in factors])
        dampings = factor_dampings([self], means, damping)
        payloads, retries = invert_factors([factors[index]], dampings[index : index + 1], method)
        return payloads[0], retries[0]

    def payload_shapes(self, method: str) -> list[list[tuple[int, ...]]]:
        """Shapes of `invert`'s payload for each factor."""
        shapes = []
        for shape in self.factor_shapes():
            if method == CHOLESKY:
                shapes.append([shape])
            elif len(shape) == 1:
                shapes.append([shape, (0, 0)])
            else:
                shapes.append([(shape[0],), shape])
        return shapes

    def precondition(self, grads, payloads, damping, method: str) -> list[tf.Tensor]:
        """F̂⁻¹ applied to the block's gradients (one tensor per variable)."""
        if self.approx == KRON:
            matrix = self.gradient_matrix(grads)
            if method == CHOLESKY:
                out = _apply_left(payloads[0][0], matrix)
                out = tf.matmul(out, payloads[1][0])
            else:
                out = _kron_eigen_solve(matrix, payloads[0], payloads[1], damping)
            return self.split_matrix(out)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        if method == CHOLESKY:
            inverse = payloads[0][0]
            out = flat * inverse if self.approx == DIAGONAL else tf.linalg.matvec(inverse, flat)
        else:
            values, vectors = payloads[0]
            damping = tf.cast(damping, flat.dtype)
            if self.approx == DIAGONAL:
                out = flat / (values + damping)
            else:
                coords = tf.linalg.matvec(vectors, flat, transpose_a=True) / (values + damping)
                out = tf.linalg.matvec(vectors, coords)
        return _split_flat(out, grads)


def factor_dampings(blocks: Sequence[Block], mean_eigenvalues: tf.Tensor, damping) -> tf.Tensor:
    """The damping added to each factor of `blocks` (in factor order) before a Cholesky inverse.

    Kronecker factors get the factored Tikhonov damping (π√λ on A, √λ/π on
    G, π from the factors' `mean_eigenvalues`); diagonal and full blocks get
    λ. All blocks at once: a few ops whatever the number of blocks.
    """
    inputs, outputs, position = [], [], 0
    for block in blocks:
        if block.approx == KRON:
            inputs.append(position)
            outputs.append(position + 1)
        position += len(block.factor_names())
    plain = tf.cast(damping, mean_eigenvalues.dtype)
    if not inputs:
        return tf.fill([position], plain)
    pi = linalg.pi_of_mean_eigenvalues(
        tf.gather(mean_eigenvalues, inputs), tf.gather(mean_eigenvalues, outputs)
    )
    on_inputs, on_outputs = linalg.split_damping(pi, damping)
    source = np.zeros(position, np.int32)  # 0: λ; then each A's, then each G's
    source[inputs] = 1 + np.arange(len(inputs))
    source[outputs] = 1 + len(inputs) + np.arange(len(outputs))
    return tf.gather(tf.concat([plain[tf.newaxis], on_inputs, on_outputs], axis=0), source)


def invert_factors(
    factors: Sequence[tf.Tensor], dampings: tf.Tensor | None, method: str
) -> tuple[list[list[tf.Tensor]], list[tf.Tensor]]:
    """The payloads of many factors, and each one's retries (int32).

    Cholesky: the inverse of each factor plus its damping (`dampings`, one
    per factor, see `factor_dampings`). Eigen: the eigendecomposition only
    (`dampings` unused, may be None);
    the exact damping is applied when preconditioning, so a new damping
    takes effect at once. Factors of equal shape share one batched op (and
    one retry loop), while each factor keeps its own damping and retries.
    """
    payloads: list[list[tf.Tensor]] = [[] for _ in factors]
    retries: list[tf.Tensor] = [tf.constant(0, tf.int32)] * len(factors)
    for group in grouping.shape_groups(factors):
        members = [factors[p] for p in group]
        if method == EIGEN:
            for p, (values, vectors) in zip(group, linalg.eigendecompositions(members)):
                payloads[p] = [values, vectors]
            continue
        inverses, tries = linalg.damped_inverses(members, tf.gather(dampings, group))
        for p, inverse, t in zip(group, inverses, tf.unstack(tries, num=len(group))):
            payloads[p], retries[p] = [inverse], t
    return payloads, retries


def _apply_left(inverse: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """A⁻¹ M, where a diagonal A⁻¹ is stored as its diagonal."""
    if inverse.shape.rank == 1:
        return inverse[:, tf.newaxis] * matrix
    return tf.matmul(inverse, matrix)


def _kron_eigen_solve(matrix, input_eig, output_eig, damping) -> tf.Tensor:
    """(A⊗G + λI)⁻¹ vec(M) through both eigenbases (exact damping)."""
    values_a, vectors_a = input_eig
    values_g, vectors_g = output_eig
    diagonal_a = vectors_a.shape[0] == 0
    coords = matrix if diagonal_a else tf.matmul(vectors_a, matrix, transpose_a=True)
    coords = tf.matmul(coords, vectors_g)
    scale = values_a[:, tf.newaxis] * values_g[tf.newaxis, :] + tf.cast(damping, matrix.dtype)
    coords = coords / scale
    out = coords if diagonal_a else tf.matmul(vectors_a, coords)
    return tf.matmul(out, vectors_g, transpose_b=True)


def _split_flat(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    sizes = [int(g.shape.num_elements()) for g in like]
    parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
    return [tf.reshape(p, g.shape) for p, g in zip(parts, like)]


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


def row_weights(records, example_weights, rows_of) -> tf.Tensor | None:
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
    input_rows: tf.Tensor, output_rows: tf.Tensor, batch_size, weights=None
) -> list[tf.Tensor]:
    """A = (1/b) Σ w ā āᵀ and G = (1/(b·T)) Σ g gᵀ (w = 1 without sample weights).

    `input_rows` holds the b·T positions of the local batch; `output_rows`
    the gradients at those positions for each output column (C·b·T rows,
    C = 1 unless the Fisher is summed over output columns exactly).
    """
    b = tf.cast(batch_size, input_rows.dtype)
    positions = input_rows.shape[0]  # static when the batch is (no shape op)
    if positions is None:
        positions = tf.cast(tf.shape(input_rows)[0], input_rows.dtype)
    weighted = input_rows if weights is None else input_rows * weights[:, tf.newaxis]
    a = tf.matmul(input_rows, weighted, transpose_a=True) / b
    g = tf.matmul(output_rows, output_rows, transpose_a=True) / positions
    return [a, g]
