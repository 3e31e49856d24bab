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

A factor of an ungrouped pair larger than the block's `max_factor_dim` is
split (`linalg.split_of`): A (n×n) is kept as its k diagonal blocks A_i
(m×m, zero-padded to k·m), a grouped factor, so A ≈ ⊕_i A_i and, with G
split into G_j likewise, F ≈ ⊕_{i,j} A_i ⊗ G_j. The gradient matrix, padded
to (k·m, k_G·m_G), is cut into its (i, j) blocks, Y_ij = A_i⁻¹ X_ij G_j⁻¹
(Cholesky) or the exact damped solve in each pair's eigenbases (eigen), a
batched product per side over the members, and the padding is cut off. The damping
stays that of the whole factor: π from tr A / n and tr G / n_G (every
member of a split factor has the whole factor's mean eigenvalue, see
`blocks.factor_dampings`), so A_i + π√λ I is exactly the diagonal block of
A + π√λ I. Only ungrouped pairs are split (a grouped part's members are a
layer's small per-group factors), and a diagonal A never is. A layer kind
may compute a split factor's blocks itself (`Block.factor_splits`, as
`records.kron_factors` does from the rows) or return the whole factor,
whose diagonal blocks are taken here.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.approximations.base import (
    Approximation,
    KronPart,
    LayerKind,
    max_factor_dim,
)
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


def _pairs(layer: LayerKind) -> list[KronPart]:
    """Every Kronecker pair of the block, the one pair of `kron_dims` as an unnamed part."""
    parts = kron_parts(layer)
    if parts is not None:
        return parts
    input_shape, output_dim = layer.kron_dims()
    return [KronPart("", input_shape, output_dim)]


def _pair_splits(
    part: KronPart, bound: int | None
) -> tuple[linalg.Split | None, linalg.Split | None]:
    """(A's, G's) split under `bound`: only ungrouped pairs, never a diagonal A."""
    if part.groups is not None:
        return None, None
    full_input = len(part.input_shape) == 2
    return (
        linalg.split_of(part.input_shape[0], bound) if full_input else None,
        linalg.split_of(part.output_dim, bound),
    )


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

    def factor_splits(self, layer: LayerKind) -> list[linalg.Split | None]:
        bound = max_factor_dim(layer)
        if bound is None:
            return [None] * len(self.factor_names(layer))
        return [split for part in _pairs(layer) for split in _pair_splits(part, bound)]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        splits = iter(self.factor_splits(layer))
        for part in _pairs(layer):
            lead = () if part.groups is None else (part.groups,)
            sides = [part.input_shape, (part.output_dim, part.output_dim)]
            for side, split in zip(sides, (next(splits), next(splits))):
                shapes.append(
                    (*lead, *side) if split is None else (split.members, split.size, split.size)
                )
        return shapes

    def group_counts(self, layer: LayerKind) -> list[int | None]:
        parts = kron_parts(layer)
        groups = [None, None] if parts is None else [g for p in parts for g in (p.groups, p.groups)]
        return [
            g if split is None else split.members
            for g, split in zip(groups, self.factor_splits(layer))
        ]

    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """[A, G] (per part, grouped and split factors batched) from the layer kind's rows.

        `example_weights` (b,) weight A: Σ_i w_i ā āᵀ / b; G carries them
        through the pseudo-loss. A split factor the layer kind returns
        whole (n, n) is cut into its diagonal blocks.
        """
        factors = layer.kron_statistics(records, output_grads, batch_size, example_weights)
        return [
            linalg.diagonal_blocks(factor, split) if factor.shape.rank == 2 else factor
            for factor, split in zip(factors, self.factor_splits(layer))
        ]

    def weighted_factors(self, layer: LayerKind | None = None) -> list[bool]:
        parts = kron_parts(layer)
        return [True, False] * (1 if parts is None else len(parts))

    def damping_rows(self, layer: LayerKind) -> list[list[int]]:
        """One row (A_j, G_j) per member pair of each part.

        A split pair (k_A and k_G members, each with the whole factor's mean
        eigenvalue) has max(k_A, k_G) rows, so that every member is in one:
        every row gives the same (π√λ, √λ/π).
        """
        rows, start = [], 0
        counts = [linalg.member_count(g) for g in self.group_counts(layer)]
        for count_a, count_g in zip(counts[::2], counts[1::2]):
            rows += [
                [start + min(j, count_a - 1), start + count_a + min(j, count_g - 1)]
                for j in range(max(count_a, count_g))
            ]
            start += count_a + count_g
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
        splits = self.factor_splits(layer)
        one_pair = kron_parts(layer) is None
        matrices = [layer.gradient_matrix(grads)] if one_pair else layer.gradient_matrices(grads)
        solved = []
        for i, matrix in enumerate(matrices):
            pair_splits = (splits[2 * i], splits[2 * i + 1])
            if pair_splits == (None, None):
                solved.append(
                    method.solve_kronecker(payloads[2 * i], payloads[2 * i + 1], matrix, damping)
                )
            else:
                solved.append(
                    _solve_split(
                        method, payloads[2 * i], payloads[2 * i + 1], matrix, pair_splits, damping
                    )
                )
        return layer.split_matrix(solved[0]) if one_pair else layer.split_matrices(solved)


def _solve_split(
    method: InverseMethod,
    input_payload: Payload,
    output_payload: Payload,
    matrix: tf.Tensor,
    splits: tuple[linalg.Split | None, linalg.Split | None],
    damping: tf.Tensor,
) -> tf.Tensor:
    """(⊕_{i,j} A_i ⊗ G_j)⁻¹ (damped) applied to the (n_in, n_out) matrix, in one batched solve.

    The padded matrix is read as its (k_A, m_A, k_G, m_G) grid of blocks
    (`InverseMethod.solve_kronecker_blocks`); a factor kept whole is one
    member of its full side.
    """
    n_in, n_out = matrix.shape
    a_split = splits[0] or linalg.Split(1, n_in, n_in)
    g_split = splits[1] or linalg.Split(1, n_out, n_out)
    padded = tf.pad(matrix, [[0, a_split.padded - n_in], [0, g_split.padded - n_out]])
    grid = tf.reshape(padded, [a_split.members, a_split.size, g_split.members, g_split.size])
    inputs = [_as_members(t, splits[0] is not None) for t in input_payload]
    outputs = [_as_members(t, splits[1] is not None) for t in output_payload]
    solved = method.solve_kronecker_blocks(inputs, outputs, grid, damping)
    return tf.reshape(solved, [a_split.padded, g_split.padded])[:n_in, :n_out]


def _as_members(tensor: tf.Tensor, split: bool) -> tf.Tensor:
    """A payload tensor with a members axis in front: a factor kept whole is one member.

    An empty tensor (identity eigenvectors left out) stays as it is.
    """
    if split or not tensor.shape.num_elements():
        return tensor
    return tensor[tf.newaxis]
