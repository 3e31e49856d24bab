"""Small linear-algebra pieces of K-FAC: damping split, damped inverses, packing.

Each function is pure and works on one factor at a time, so that the placement
plan can hand any factor to any replica. Shapes are static (TPU/XLA friendly).
"""

from __future__ import annotations

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


def mean_eigenvalue(factor: tf.Tensor) -> tf.Tensor:
    """tr(F)/dim(F) of a full (n, n) or diagonal (n,) factor."""
    if factor.shape.rank == 1:
        return tf.reduce_mean(factor)
    return tf.linalg.trace(factor) / factor.shape[-1]


def pi_adjustment(input_factor: tf.Tensor, output_factor: tf.Tensor) -> tf.Tensor:
    """π = sqrt((tr A/dim A) / (tr G/dim G)) (Martens & Grosse 2015, §6.3).

    Falls back to 1 when either trace is not positive (an all-zero factor, for
    instance before any statistics), which keeps the damping split finite.
    """
    a = mean_eigenvalue(input_factor)
    g = mean_eigenvalue(output_factor)
    ok = tf.logical_and(a > 0, g > 0)
    return tf.where(ok, tf.sqrt(tf.math.divide_no_nan(a, g)), tf.ones_like(a))


def factored_damping(
    input_factor: tf.Tensor, output_factor: tf.Tensor, damping: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Damping added to (A, G): (π√λ, √λ/π), so that their product keeps λ."""
    pi = pi_adjustment(input_factor, output_factor)
    root = tf.sqrt(tf.cast(damping, input_factor.dtype))
    return pi * root, root / pi


def damped_inverse(factor: tf.Tensor, damping: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(F + damping·I)⁻¹ through Cholesky, retrying with more damping.

    Returns the inverse and the number of retries it took. A diagonal factor
    (rank 1) is inverted elementwise. An attempt is accepted only when it is
    finite and well-conditioned: max diag(M⁻¹)·max diag(M) is a lower bound
    of M's condition number, and a factor with an eigenvalue near −damping
    makes it of order 1/eps (its "inverse" is then rounding noise with huge
    entries). If every retry fails the result is NaN, and the caller keeps
    the previous inverse.
    """
    damping = tf.cast(damping, factor.dtype)
    if factor.shape.rank == 1:
        return 1.0 / (factor + damping), tf.constant(0, tf.int32)
    n = factor.shape[-1]
    eye = tf.eye(n, dtype=factor.dtype)
    symmetric = 0.5 * (factor + tf.transpose(factor))
    max_condition = 1.0 / (CONDITIONING_TOLERANCE * np.finfo(factor.dtype.as_numpy_dtype).eps)

    def attempt(extra: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        damped = symmetric + extra * eye
        inverse = tf.linalg.cholesky_solve(tf.linalg.cholesky(damped), eye)
        condition_bound = tf.reduce_max(tf.linalg.diag_part(inverse)) * tf.reduce_max(
            tf.linalg.diag_part(damped)
        )
        accepted = tf.logical_and(
            tf.reduce_all(tf.math.is_finite(inverse)), condition_bound <= max_condition
        )
        return inverse, accepted

    def not_done(tries, extra, inverse, accepted):
        return tf.logical_and(tries < DAMPING_RETRIES, tf.logical_not(accepted))

    def retry(tries, extra, inverse, accepted):
        extra = extra * DAMPING_RETRY_GROWTH
        return (tries + 1, extra, *attempt(extra))

    tries, _, inverse, accepted = tf.while_loop(
        not_done, retry, (tf.constant(0, tf.int32), damping, *attempt(damping))
    )
    failed = tf.fill(tf.shape(inverse), tf.constant(np.nan, factor.dtype))
    return tf.where(accepted, inverse, failed), tries


def eigendecomposition(factor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Eigenvalues (clipped at 0, the factor is PSD) and eigenvectors of F.

    A diagonal factor is its own eigendecomposition: its eigenvectors are the
    identity, which is never materialised (returned as an empty (0, 0) tensor).
    """
    if factor.shape.rank == 1:
        return tf.maximum(factor, 0.0), tf.zeros([0, 0], factor.dtype)
    symmetric = 0.5 * (factor + tf.transpose(factor))
    values, vectors = tf.linalg.eigh(symmetric)
    return tf.maximum(values, 0.0), vectors


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
    """Upper triangle of a symmetric (n, n) matrix as a flat vector."""
    n = matrix.shape[-1]
    flat_index, _ = _triangle_indices(n)
    return tf.gather(tf.reshape(matrix, [-1]), flat_index)


def unpack_symmetric(packed: tf.Tensor, n: int) -> tf.Tensor:
    """Inverse of `pack_symmetric`."""
    _, packed_of = _triangle_indices(n)
    return tf.reshape(tf.gather(packed, packed_of), [n, n])
