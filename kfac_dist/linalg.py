"""Small linear-algebra pieces of K-FAC: damping split, damped inverses, packing.

Each function is pure. Inverses and eigendecompositions take a group of
equally shaped factors, so that one batched op serves any set of factors the
placement plan hands a replica. Shapes are static (TPU/XLA friendly).

A grouped factor is block diagonal with g equal-sized blocks, its members,
stored with a leading group axis: (g, n, n), or (g, n) for diagonal
members. Whether a factor is grouped is said by its number of groups (None:
not grouped), since a (g, n) shape alone could be either. All the linear
algebra (damping, inversion) is done on members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf


def curvature_dtype() -> tf.DType:
    """Factors and inverses are float32, or float64 when Keras' floatx is float64.

    Under mixed precision (float16/bfloat16 compute) they stay float32.
    """
    return tf.float64 if keras.config.floatx() == "float64" else tf.float32


# Cholesky on a matrix that is not numerically positive definite returns NaN
# in TF 2.21 (it does not raise): such a factor is retried with more damping.
DAMPING_RETRIES = 6
DAMPING_RETRY_GROWTH = 10.0
# An attempt is rejected when its condition number may exceed 1/(this · eps):
# the inverse of a near-singular damped factor is rounding noise.
CONDITIONING_TOLERANCE = 10.0


class Split(NamedTuple):
    """A factor of side `dim` kept as `members` diagonal blocks of side `size`.

    `members · size ≥ dim`: the last block is zero-padded, and the padded
    coordinates take the damping only (their gradient entries are zero,
    and cut off after preconditioning).
    """

    members: int
    size: int
    dim: int

    @property
    def padded(self) -> int:
        """members · size: the side of the zero-padded factor."""
        return self.members * self.size


def split_of(dim: int, max_dim: int | None) -> Split | None:
    """How a (dim, dim) factor is split under the bound `max_dim` (None: it is not).

    k = ceil(dim / max_dim) blocks of side m = ceil(dim / k) ≤ max_dim: as
    equal as blocks of one size can be, so the padding is under k.
    """
    if max_dim is None or dim <= max_dim:
        return None
    members = -(-dim // max_dim)
    return Split(members, -(-dim // members), dim)


def split_rows(rows: tf.Tensor, split: Split | None) -> tf.Tensor:
    """(R, n) rows as (R, k, m) blocks of coordinates (zero-padded), or as they are."""
    if split is None:
        return rows
    padded = tf.pad(rows, [[0, 0], [0, split.padded - split.dim]])
    return tf.reshape(padded, [-1, split.members, split.size])


def diagonal_blocks(factor: tf.Tensor, split: Split | None) -> tf.Tensor:
    """The (k, m, m) diagonal blocks of a full (n, n) factor (zero-padded), or it as it is."""
    if split is None:
        return factor
    pad = split.padded - split.dim
    padded = tf.pad(factor, [[0, pad], [0, pad]]) if pad else factor
    m = split.size
    # k slices copy only the k·m² entries kept, not the whole factor.
    return tf.stack(
        [padded[i * m : (i + 1) * m, i * m : (i + 1) * m] for i in range(split.members)]
    )


def member_shape(shape: Sequence[int], groups: int | None) -> tuple[int, ...]:
    """The shape of one member of a factor: the factor's own shape when it is not grouped."""
    return tuple(shape[1:]) if groups is not None else tuple(shape)


def member_count(groups: int | None) -> int:
    """The number of members of a factor: its groups, or 1 when it is not grouped."""
    return 1 if groups is None else int(groups)


def members(factor: tf.Tensor, groups: int | None) -> tf.Tensor:
    """A factor as a (members, *member shape) stack: a grouped factor as it is."""
    return factor if groups is not None else factor[tf.newaxis]


def members_of_stack(stack: tf.Tensor, groups: int | None) -> tf.Tensor:
    """A (k, ...) stack of equally grouped factors as one stack of their k·g members."""
    if groups is None:
        return stack
    return tf.reshape(stack, [-1, *stack.shape[2:]])


def mean_eigenvalue(factor: tf.Tensor) -> tf.Tensor:
    """tr(F)/dim(F) of a full (n, n) or diagonal (n,) factor."""
    return mean_eigenvalues(factor[tf.newaxis])[0]


def mean_eigenvalues(factors: tf.Tensor) -> tf.Tensor:
    """tr(F)/dim(F) of each of a stack of full (k, n, n) or diagonal (k, n) factors."""
    diagonals = factors if factors.shape.rank == 2 else tf.linalg.diag_part(factors)
    return tf.reduce_mean(diagonals, axis=-1)


def pi_adjustment(input_factor: tf.Tensor, output_factor: tf.Tensor) -> tf.Tensor:
    """π = sqrt((tr A/dim A) / (tr G/dim G)) (Martens & Grosse 2015, §6.3)."""
    return pi_of_mean_eigenvalues(mean_eigenvalue(input_factor), mean_eigenvalue(output_factor))


def pi_of_mean_eigenvalues(input_mean: tf.Tensor, output_mean: tf.Tensor) -> tf.Tensor:
    """π from tr A/dim A and tr G/dim G, elementwise (many blocks at once).

    Falls back to 1 when either trace is not positive (an all-zero factor, for
    instance before any statistics), which keeps the damping split finite.
    """
    ok = tf.logical_and(input_mean > 0, output_mean > 0)
    ratio = tf.math.divide_no_nan(input_mean, output_mean)
    return tf.where(ok, tf.sqrt(ratio), tf.ones_like(input_mean))


def factored_damping(
    input_factor: tf.Tensor, output_factor: tf.Tensor, damping: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Damping added to (A, G): (π√λ, √λ/π), so that their product keeps λ."""
    return split_damping(pi_adjustment(input_factor, output_factor), damping)


def split_damping(pi: tf.Tensor, damping: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(π√λ, √λ/π) for a π of one block or a vector of blocks' π."""
    root = tf.sqrt(tf.cast(damping, pi.dtype))
    return pi * root, root / pi


def damped_inverse(factor: tf.Tensor, damping: tf.Tensor | float) -> tuple[tf.Tensor, tf.Tensor]:
    """(F + damping·I)⁻¹ of one factor: see `damped_inverses`."""
    inverses, retries = damped_inverses([factor], tf.reshape(tf.cast(damping, factor.dtype), [1]))
    return inverses[0], retries[0]


def damped_inverses(
    factors: Sequence[tf.Tensor], dampings: tf.Tensor
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """(F_i + d_i·I)⁻¹ of equally shaped factors: see `damped_inverses_of_stack`.

    Returns the inverses and each one's number of retries.
    """
    inverses, retries = damped_inverses_of_stack(tf.stack(factors), dampings)
    return tf.unstack(inverses, num=len(factors)), retries


def damped_inverses_of_stack(
    stacked: tf.Tensor, dampings: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """(F_i + d_i·I)⁻¹ of a (k, n, n) stack through Cholesky, retrying with more damping.

    The factors share one batched Cholesky and one retry loop, so that the
    graph grows with the number of factor sizes, not of factors; each factor
    still retries on its own (only those not yet accepted get more damping).
    `dampings` holds one damping per factor (k,). Returns the (k, n, n)
    inverses and each one's number of retries (k,). A (k, n) stack of
    diagonal factors is inverted elementwise. An attempt is accepted only
    when it is finite and well-conditioned: max diag(M⁻¹)·max diag(M) is a
    lower bound of M's condition number, and a factor with an eigenvalue
    near −damping makes it of order 1/eps (its "inverse" is then rounding
    noise with huge entries). A factor with no accepted retry is NaN, and
    the caller keeps its previous inverse. The members of grouped factors
    (see `members`) enter the stack as factors of their own.
    """
    damping = tf.cast(dampings, stacked.dtype)
    count = stacked.shape[0]
    if stacked.shape.rank == 2:
        inverses = 1.0 / (stacked + damping[:, tf.newaxis])
        return inverses, tf.zeros([count], tf.int32)
    eye = tf.eye(stacked.shape[-1], batch_shape=[count], dtype=stacked.dtype)
    symmetric = 0.5 * (stacked + tf.linalg.matrix_transpose(stacked))
    max_condition = 1.0 / (CONDITIONING_TOLERANCE * np.finfo(stacked.dtype.as_numpy_dtype).eps)

    def attempt(extra: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        damped = symmetric + extra[:, tf.newaxis, tf.newaxis] * eye
        inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(damped), eye)
        condition_bound = tf.reduce_max(tf.linalg.diag_part(inverse), axis=-1) * tf.reduce_max(
            tf.linalg.diag_part(damped), axis=-1
        )
        accepted = tf.logical_and(
            tf.reduce_all(tf.math.is_finite(inverse), axis=[-2, -1]),
            condition_bound <= max_condition,
        )
        return inverse, accepted

    def not_done(
        retries: tf.Tensor, extra: tf.Tensor, inverse: tf.Tensor, accepted: tf.Tensor
    ) -> tf.Tensor:
        # Every factor still pending has retried as often as the loop ran.
        return tf.reduce_any(tf.logical_and(retries < DAMPING_RETRIES, tf.logical_not(accepted)))

    def retry(
        retries: tf.Tensor, extra: tf.Tensor, inverse: tf.Tensor, accepted: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        pending = tf.logical_not(accepted)
        extra = tf.where(pending, extra * DAMPING_RETRY_GROWTH, extra)
        attempted, attempt_accepted = attempt(extra)
        inverse = tf.where(pending[:, tf.newaxis, tf.newaxis], attempted, inverse)
        accepted = tf.where(pending, attempt_accepted, accepted)
        return retries + tf.cast(pending, tf.int32), extra, inverse, accepted

    retries, _, inverse, accepted = tf.while_loop(
        not_done, retry, (tf.zeros([count], tf.int32), damping, *attempt(damping))
    )
    failed = tf.fill(tf.shape(inverse), tf.constant(np.nan, stacked.dtype))
    inverse = tf.where(accepted[:, tf.newaxis, tf.newaxis], inverse, failed)
    return inverse, retries


def eigendecompositions(factors: Sequence[tf.Tensor]) -> list[tuple[tf.Tensor, tf.Tensor]]:
    """Eigenvalues and eigenvectors of equally shaped factors: see `eigendecompositions_of_stack`.

    A diagonal factor's eigenvectors are an empty (0, 0) tensor.
    """
    values, vectors = eigendecompositions_of_stack(tf.stack(factors))
    if vectors.shape.rank == 2:
        return [(v, vectors) for v in tf.unstack(values, num=len(factors))]
    return list(zip(tf.unstack(values, num=len(factors)), tf.unstack(vectors, num=len(factors))))


def eigendecompositions_of_stack(stacked: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigenvalues (clipped at 0, the factors are PSD) and eigenvectors of a (k, n, n) stack.

    One batched `eigh` for the stack: (k, n) values and (k, n, n) vectors. A
    (k, n) stack of diagonal factors is its own eigendecomposition: its
    eigenvectors are the identity, which is never materialised (returned as
    one empty (0, 0) tensor).
    """
    if stacked.shape.rank == 2:
        return tf.maximum(stacked, 0.0), tf.zeros([0, 0], stacked.dtype)
    symmetric = 0.5 * (stacked + tf.linalg.matrix_transpose(stacked))
    values, vectors = tf.linalg.eigh(symmetric)
    return tf.maximum(values, 0.0), vectors


def eigendecomposition(factor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigendecomposition of one factor: see `eigendecompositions`."""
    return eigendecompositions([factor])[0]


def kl_clip_factor(
    inner_product: tf.Tensor,
    learning_rate: tf.Tensor,
    norm_constraint: tf.Tensor,
    momentum: tf.Tensor | float = 0.0,
    velocity_gradient: tf.Tensor | float = 0.0,
    velocity_curvature: tf.Tensor | float = 0.0,
) -> tf.Tensor:
    """min(1, sqrt(C / |q|)) for the step Δ = μv − lr·P∇ of curvature q = ΔᵀF̂Δ.

    q = lr²⟨P∇, ∇⟩ − 2μ·lr⟨v, ∇⟩ + μ²⟨v, F̂v⟩, since F̂·P∇ = ∇. With μ = 0 it is
    Ba, Grosse & Martens' (2017) clip of the preconditioned gradient; with
    momentum it bounds the step actually taken, which momentum would
    otherwise let grow to 1/(1−μ) times the bound's step.
    """
    dtype = inner_product.dtype
    lr = tf.cast(learning_rate, dtype)
    mu = tf.cast(momentum, dtype)
    bound = tf.cast(norm_constraint, dtype)
    curvature = (
        lr * lr * inner_product
        - 2.0 * mu * lr * tf.cast(velocity_gradient, dtype)
        + mu * mu * tf.cast(velocity_curvature, dtype)
    )
    ratio = tf.math.divide_no_nan(bound, tf.abs(curvature))
    return tf.where(
        curvature == 0, tf.ones_like(ratio), tf.minimum(tf.ones_like(ratio), tf.sqrt(ratio))
    )


def triangle_size(n: int) -> int:
    """Number of entries of the upper triangle (diagonal included) of an n×n matrix."""
    return n * (n + 1) // 2


def _triangle_indices(n: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.triu_indices(n)
    packed_of = np.zeros((n, n), dtype=np.int32)
    packed_of[rows, cols] = np.arange(rows.size, dtype=np.int32)
    packed_of[cols, rows] = packed_of[rows, cols]
    return (rows * n + cols).astype(np.int32), packed_of.reshape(-1)


def pack_symmetric(matrix: tf.Tensor) -> tf.Tensor:
    """Upper triangle of symmetric (..., n, n) matrices as (..., n(n+1)/2) vectors."""
    n = matrix.shape[-1]
    flat_index, _ = _triangle_indices(n)
    flat = tf.reshape(matrix, [*matrix.shape[:-2], n * n])
    return tf.gather(flat, flat_index, axis=-1)


def unpack_symmetric(packed: tf.Tensor, n: int) -> tf.Tensor:
    """Inverse of `pack_symmetric`."""
    _, packed_of = _triangle_indices(n)
    full = tf.gather(packed, packed_of, axis=-1)
    return tf.reshape(full, [*packed.shape[:-1], n, n])
