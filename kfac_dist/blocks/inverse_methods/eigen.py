"""Eigendecompositions, with the exact damping applied at preconditioning.

The payload is (eigenvalues, eigenvectors) of the undamped factor, so a new
damping takes effect at once, without a new decomposition. A Kronecker block
is solved as (A ⊗ G + λI)⁻¹ through both eigenbases (member by member, as
a batch, for grouped factors).
"""

from __future__ import annotations

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.inverse_methods.base import InverseMethod, Payload, grouped_shapes
from kfac_dist.options import EIGEN


class Eigen(InverseMethod):
    """Payload: (values, vectors); a diagonal factor's vectors are an empty (0, 0) tensor."""

    name = EIGEN
    needs_factor_damping = False

    def payload_shapes(
        self, factor_shape: tuple[int, ...], groups: int | None = None
    ) -> list[tuple[int, ...]]:
        member = linalg.member_shape(factor_shape, groups)
        if len(member) == 1:
            return grouped_shapes([member, (0, 0)], groups)
        return grouped_shapes([(member[0],), member], groups)

    def invert_stack(
        self, stack: tf.Tensor, dampings: tf.Tensor | None
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        values, vectors = linalg.eigendecompositions_of_stack(stack)
        return [values, vectors], tf.zeros([stack.shape[0]], tf.int32)

    def solve(self, payload: Payload, vector: tf.Tensor, damping: tf.Tensor) -> tf.Tensor:
        values, vectors = payload
        damping = tf.cast(damping, vector.dtype)
        if _is_diagonal(vectors):
            return vector / (values + damping)
        coords = tf.linalg.matvec(vectors, vector, transpose_a=True) / (values + damping)
        return tf.linalg.matvec(vectors, coords)

    def solve_kronecker(
        self,
        input_payload: Payload,
        output_payload: Payload,
        matrix: tf.Tensor,
        damping: tf.Tensor,
    ) -> tf.Tensor:
        """(A⊗G + λI)⁻¹ vec(M) through both eigenbases (exact damping)."""
        values_a, vectors_a = input_payload
        values_g, vectors_g = output_payload
        diagonal_a = _is_diagonal(vectors_a)
        coords = matrix if diagonal_a else tf.matmul(vectors_a, matrix, transpose_a=True)
        coords = tf.matmul(coords, vectors_g)
        scale = values_a[..., :, tf.newaxis] * values_g[..., tf.newaxis, :] + tf.cast(
            damping, matrix.dtype
        )
        coords = coords / scale
        out = coords if diagonal_a else tf.matmul(vectors_a, coords)
        return tf.matmul(out, vectors_g, transpose_b=True)

    def solve_kronecker_blocks(
        self,
        input_payload: Payload,
        output_payload: Payload,
        grid: tf.Tensor,
        damping: tf.Tensor,
    ) -> tf.Tensor:
        """Each block in its pair's eigenbases, divided by e_A[i, a]·e_G[j, c] + λ, rotated back."""
        values_a, vectors_a = input_payload
        values_g, vectors_g = output_payload
        diagonal_a = _is_diagonal(vectors_a)
        coords = grid if diagonal_a else tf.einsum("iba,ibjc->iajc", vectors_a, grid)
        coords = tf.einsum("iajc,jcd->iajd", coords, vectors_g)
        scale = values_a[:, :, tf.newaxis, tf.newaxis] * values_g[tf.newaxis, tf.newaxis]
        coords = coords / (scale + tf.cast(damping, grid.dtype))
        out = coords if diagonal_a else tf.einsum("iab,ibjc->iajc", vectors_a, coords)
        return tf.einsum("iajc,jdc->iajd", out, vectors_g)


def _is_diagonal(vectors: tf.Tensor) -> bool:
    """Whether the payload is a diagonal factor's (its identity eigenvectors left out)."""
    return vectors.shape.num_elements() == 0
