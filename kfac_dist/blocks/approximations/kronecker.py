"""The Kronecker-factored approximation (K-FAC): F ≈ A ⊗ G per layer.

A is the second moment of the layer's inputs (or its diagonal, for an
embedding), G that of the gradients at its outputs; both come from the
layer kind's Kronecker interface. Cholesky damping is factored Tikhonov:
π√λ on A and √λ/π on G, π = sqrt((tr A/dim A) / (tr G/dim G)).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.approximations.base import Approximation, LayerKind
from kfac_dist.blocks.inverse_methods import InverseMethod, Payload
from kfac_dist.blocks.records import Record
from kfac_dist.options import KRON


class Kronecker(Approximation):
    """Factors [A, G] of the layer's (input side, output side) gradient matrix."""

    name = KRON

    def factor_names(self) -> list[str]:
        return ["A", "G"]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        input_shape, output_dim = layer.kron_dims()
        return [input_shape, (output_dim, output_dim)]

    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """[A, G] from the layer kind's rows.

        `example_weights` (b,) weight A: Σ_i w_i ā āᵀ / b; G carries them
        through the pseudo-loss.
        """
        return layer.kron_statistics(records, output_grads, batch_size, example_weights)

    def weighted_factors(self) -> list[bool]:
        return [True, False]

    def factor_dampings(self, mean_eigenvalues: tf.Tensor, damping: tf.Tensor | float) -> tf.Tensor:
        """(π√λ, √λ/π) for each block; π falls back to 1 when a trace is not positive."""
        pi = linalg.pi_of_mean_eigenvalues(mean_eigenvalues[:, 0], mean_eigenvalues[:, 1])
        on_inputs, on_outputs = linalg.split_damping(pi, damping)
        return tf.stack([on_inputs, on_outputs], axis=1)

    def precondition(
        self,
        layer: LayerKind,
        grads: Sequence[tf.Tensor],
        payloads: Sequence[Payload],
        damping: tf.Tensor,
        method: InverseMethod,
    ) -> list[tf.Tensor]:
        matrix = layer.gradient_matrix(grads)
        return layer.split_matrix(method.solve_kronecker(payloads[0], payloads[1], matrix, damping))
