"""The Kronecker-factored approximation (K-FAC): F ≈ A ⊗ G per layer.

A is the second moment of the layer's inputs (or its diagonal, for an
embedding), G that of the gradients at its outputs; both come from the
layer kind's Kronecker interface. Cholesky damping is factored Tikhonov:
π√λ on A and √λ/π on G, π = sqrt((tr A/dim A) / (tr G/dim G)).

A layer kind may have several Kronecker pairs, or grouped ones
(`LayerKind.kron_parts`): a depthwise convolution has one small pair per
channel, kept as one grouped A (C, k, k) and one grouped G (C, M, M), so
that F ≈ ⊕_c A_c ⊗ G_c; a separable convolution adds its pointwise pair.
Each member pair (A_c, G_c) gets its own π, and its gradient matrix is
preconditioned by its own pair, all members in one batched solve.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.approximations.base import Approximation, KronPart, LayerKind
from kfac_dist.blocks.inverse_methods import InverseMethod, Payload
from kfac_dist.blocks.records import Record
from kfac_dist.options import KRON


def kron_parts(layer: LayerKind | None) -> list[KronPart] | None:
    """The layer kind's Kronecker parts, or None for the one pair of `kron_dims`.

    `kron_parts` is optional: a layer kind without it (or whose
    `kron_parts` returns None) has one ungrouped pair.
    """
    parts = getattr(layer, "kron_parts", None)
    return None if parts is None else parts()


class Kronecker(Approximation):
    """Factors [A, G] of the layer's (input side, output side) gradient matrix.

    A layer kind with `kron_parts` has [A, G] per part, named
    "<part>_A", "<part>_G" (plain "A", "G" for a part named "").
    """

    name = KRON

    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        parts = kron_parts(layer)
        if parts is None:
            return ["A", "G"]
        prefixes = [f"{part.name}_" if part.name else "" for part in parts]
        return [f"{prefix}{side}" for prefix in prefixes for side in ("A", "G")]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        parts = kron_parts(layer)
        if parts is None:
            input_shape, output_dim = layer.kron_dims()
            return [input_shape, (output_dim, output_dim)]
        shapes: list[tuple[int, ...]] = []
        for part in parts:
            lead = () if part.groups is None else (part.groups,)
            shapes += [(*lead, *part.input_shape), (*lead, part.output_dim, part.output_dim)]
        return shapes

    def group_counts(self, layer: LayerKind) -> list[int | None]:
        parts = kron_parts(layer)
        if parts is None:
            return [None, None]
        return [groups for part in parts for groups in (part.groups, part.groups)]

    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """[A, G] (per part, grouped factors batched) from the layer kind's rows.

        `example_weights` (b,) weight A: Σ_i w_i ā āᵀ / b; G carries them
        through the pseudo-loss.
        """
        return layer.kron_statistics(records, output_grads, batch_size, example_weights)

    def weighted_factors(self, layer: LayerKind | None = None) -> list[bool]:
        parts = kron_parts(layer)
        return [True, False] * (1 if parts is None else len(parts))

    def damping_rows(self, layer: LayerKind) -> list[list[int]]:
        """One row (A_j, G_j) per member pair of each part."""
        parts = kron_parts(layer)
        if parts is None:
            return [[0, 1]]
        rows, start = [], 0
        for part in parts:
            count = linalg.member_count(part.groups)
            rows += [[start + j, start + count + j] for j in range(count)]
            start += 2 * count
        return rows

    def factor_dampings(self, mean_eigenvalues: tf.Tensor, damping: tf.Tensor | float) -> tf.Tensor:
        """(π√λ, √λ/π) for each pair; π falls back to 1 when a trace is not positive."""
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
        if kron_parts(layer) is None:
            matrix = layer.gradient_matrix(grads)
            solved = method.solve_kronecker(payloads[0], payloads[1], matrix, damping)
            return layer.split_matrix(solved)
        matrices = layer.gradient_matrices(grads)
        solved = [
            method.solve_kronecker(payloads[2 * i], payloads[2 * i + 1], matrix, damping)
            for i, matrix in enumerate(matrices)
        ]
        return layer.split_matrices(solved)
