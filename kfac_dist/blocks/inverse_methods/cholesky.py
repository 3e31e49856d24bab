"""Cholesky inverses with each factor's damping baked in.

Each factor is inverted with the damping its approximation gives it (see
`Approximation.factor_dampings`: π√λ on A and √λ/π on G of a Kronecker
block, λ on a diagonal or full one), retrying with more damping when the
damped factor is not numerically positive definite. The payload is the
damped inverse itself, so a Kronecker block is preconditioned by two
matrix products (batched over the group axis of grouped factors).
"""

from __future__ import annotations

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.inverse_methods.base import InverseMethod, Payload, grouped_shapes
from kfac_dist.options import CHOLESKY


class Cholesky(InverseMethod):
    """Payload: (F + d·I)⁻¹, a diagonal factor's as its diagonal."""

    name = CHOLESKY
    needs_factor_damping = True

    def payload_shapes(
        self, factor_shape: tuple[int, ...], groups: int | None = None
    ) -> list[tuple[int, ...]]:
        return grouped_shapes([linalg.member_shape(factor_shape, groups)], groups)

    def invert_stack(
        self, stack: tf.Tensor, dampings: tf.Tensor | None
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        if dampings is None:
            raise ValueError("Cholesky inverses need each factor's damping.")
        inverses, tries = linalg.damped_inverses_of_stack(stack, dampings)
        return [inverses], tries

    def solve(self, payload: Payload, vector: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
        (inverse,) = payload
        if inverse.shape.rank == 1:
            return vector * inverse
        return tf.linalg.matvec(inverse, vector)

    def solve_kronecker(
        self,
        input_payload: Payload,
        output_payload: Payload,
        matrix: tf.Tensor,
        damping: tf.Tensor,
    ) -> tf.Tensor:
        (input_inverse,), (output_inverse,) = input_payload, output_payload
        return tf.matmul(_apply_left(input_inverse, matrix), output_inverse)

    def solve_kronecker_blocks(
        self,
        input_payload: Payload,
        output_payload: Payload,
        grid: tf.Tensor,
        damping: tf.Tensor,
    ) -> tf.Tensor:
        """Y[i, :, j, :] = A_i⁻¹ X[i, :, j, :] G_j⁻¹, one einsum per side."""
        (input_inverse,), (output_inverse,) = input_payload, output_payload
        if input_inverse.shape.rank == 2:  # diagonal A: (k_A, m_A)
            left = input_inverse[:, :, tf.newaxis, tf.newaxis] * grid
        else:
            left = tf.einsum("iab,ibjc->iajc", input_inverse, grid)
        return tf.einsum("iajc,jcd->iajd", left, output_inverse)


def _apply_left(inverse: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
    """A⁻¹ M, where a diagonal A⁻¹ is stored as its diagonal (a batch of them: (g, n))."""
    if inverse.shape.rank == matrix.shape.rank - 1:
        return inverse[..., tf.newaxis] * matrix
    return tf.matmul(inverse, matrix)
