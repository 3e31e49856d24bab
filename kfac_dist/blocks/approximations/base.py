"""The interface every curvature approximation answers, and what it asks of a layer kind.

An approximation is the structure of a block's Fisher: which factors it
keeps, their batch statistics, how the damping is spread over them, and how
their payloads precondition the block's gradients. It reads the layer
through `LayerKind`: a Kronecker-factored approximation through the
layer's Kronecker interface, a per-example one through its per-example
gradients. Approximations hold no state: one instance serves every block.

A factor may be grouped: g equal-sized members on a leading axis, a block
diagonal factor of g blocks (see `linalg.members`). Dampings are computed
per member: `damping_rows` says which members of a block share one
damping computation (a Kronecker pair (A_j, G_j)).

A factor larger than the block's `max_factor_dim` may be split
(`factor_splits`): kept as the k diagonal blocks of one block-diagonal
approximation of it, a grouped factor of k members, so that no inversion
and no preconditioning product exceeds the bound (`linalg.split_of`).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar, NamedTuple, Protocol

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.inverse_methods import InverseMethod, Payload
from kfac_dist.blocks.records import Record


def max_factor_dim(layer: object) -> int | None:
    """The block's bound on a factor's side (None: no bound; a layer kind without one has none)."""
    bound = getattr(layer, "max_factor_dim", None)
    return None if bound is None else int(bound)


class KronPart(NamedTuple):
    """One Kronecker pair (A, G) of a layer kind with several or grouped pairs.

    `input_shape` is the shape of one member of A ((n, n), or (n,) when
    diagonal), `output_dim` the side of one member of G, `groups` the number
    of members (None: A and G are single factors). `name` prefixes the
    factor names ("" for a block's only part).
    """

    name: str
    input_shape: tuple[int, ...]
    output_dim: int
    groups: int | None = None


class LayerKind(Protocol):
    """What an approximation reads from a block: its variables and how they map onto it."""

    @property
    def num_params(self) -> int:
        """Number of scalars in the block's variables."""
        ...

    # --- the Kronecker interface ---------------------------------------------
    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        """Shapes of the Kronecker factors: (input factor shape, output dim)."""
        ...

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """The batch's Kronecker factors [A, G]."""
        ...

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        """The block's gradients as one (input side, output side) matrix."""
        ...

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of `gradient_matrix`: one tensor per variable."""
        ...

    # --- ... with several or grouped Kronecker pairs (optional) ----------------
    def kron_parts(self) -> list[KronPart] | None:
        """The Kronecker pairs, when not the one ungrouped pair of `kron_dims` (None)."""
        ...

    def gradient_matrices(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """One gradient matrix per part: (in, out), or (g, in, out) for a grouped part."""
        ...

    def split_matrices(self, matrices: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Inverse of `gradient_matrices`: one tensor per variable."""
        ...

    # --- the per-example interface -------------------------------------------
    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        """(C·b, num_params): each example's gradients per output column, variables in order."""
        ...


class Approximation(abc.ABC):
    """A curvature block's structure: its factors, their statistics, and preconditioning."""

    #: the `fisher_approx` option that selects it.
    name: ClassVar[str]

    @abc.abstractmethod
    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        """One name per factor (in variable and unit names) of `layer`'s block."""

    @abc.abstractmethod
    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        """The shape of each factor of `layer`'s block: (n, n) full or (n,) diagonal."""

    @abc.abstractmethod
    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """Batch statistics of each factor (means over the local batch)."""

    @abc.abstractmethod
    def precondition(
        self,
        layer: LayerKind,
        grads: Sequence[tf.Tensor],
        payloads: Sequence[Payload],
        damping: tf.Tensor,
        method: InverseMethod,
    ) -> list[tf.Tensor]:
        """F̂⁻¹ applied to the block's gradients (one tensor per variable)."""

    def group_counts(self, layer: LayerKind) -> list[int | None]:
        """Each factor's number of groups (None: not grouped; none is by default)."""
        return [None] * len(self.factor_names(layer))

    def factor_splits(self, layer: LayerKind) -> list[linalg.Split | None]:
        """Each factor's split into diagonal blocks (None: kept whole; none is by default).

        A split factor is grouped: `group_counts` gives its number of
        blocks, `factor_shapes` its (k, m, m) shape.
        """
        return [None] * len(self.factor_names(layer))

    def weighted_factors(self, layer: LayerKind | None = None) -> list[bool]:
        """Which factors carry the sample weights (the curvature divides them by the mean weight).

        None by default: per-example statistics carry the weights through
        the pseudo-loss alone.
        """
        return [False] * len(self.factor_names(layer))

    def damping_rows(self, layer: LayerKind) -> list[list[int]]:
        """The members whose dampings are computed together, as positions in the block.

        A block's members are numbered factor by factor (a grouped factor's
        g members in order, an ungrouped factor one member). Each row is one
        call's worth of `factor_dampings`; every row of an approximation has
        the same length. By default, one row of all of the block's factors.
        """
        return [list(range(len(self.factor_names(layer))))]

    def factor_dampings(self, mean_eigenvalues: tf.Tensor, damping: tf.Tensor | float) -> tf.Tensor:
        """The damping of each member in k rows (`damping_rows`) of this approximation.

        `mean_eigenvalues` (k, row length), tr(F)/dim(F) of each member (a
        factor that is not grouped is its only member); returns the same
        shape. By default every member gets λ.
        """
        return tf.fill(mean_eigenvalues.shape.as_list(), tf.cast(damping, mean_eigenvalues.dtype))


class PerExample(Approximation):
    """A block over the flat vector of its variables, from per-example gradients."""

    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """The second moment of the per-example gradients (weights ride on the pseudo-loss)."""
        per_example = layer.per_example_gradients(records, output_grads)
        split = self.factor_splits(layer)[0]
        return [self.second_moment(per_example, tf.cast(batch_size, per_example.dtype), split)]

    @abc.abstractmethod
    def second_moment(
        self, per_example: tf.Tensor, batch_size: tf.Tensor, split: linalg.Split | None = None
    ) -> tf.Tensor:
        """(1/b) Σ ĝ ĝᵀ, or its diagonal, of the (C·b, n) per-example gradients.

        With `split`, the (k, m, m) diagonal blocks of the matrix only.
        """

    def precondition(
        self,
        layer: LayerKind,
        grads: Sequence[tf.Tensor],
        payloads: Sequence[Payload],
        damping: tf.Tensor,
        method: InverseMethod,
    ) -> list[tf.Tensor]:
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        split = self.factor_splits(layer)[0]
        if split is None:
            return split_flat(method.solve(payloads[0], flat, damping), grads)
        # Each diagonal block solves its own coordinates (padded with zeros, then cut).
        blocks = linalg.split_rows(flat[tf.newaxis], split)[0]
        solved = tf.reshape(method.solve(payloads[0], blocks, damping), [-1])
        return split_flat(solved[: split.dim], grads)


def split_flat(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """A flat vector cut into tensors shaped as `like`, in order."""
    sizes = [int(g.shape.num_elements()) for g in like]
    parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
    return [tf.reshape(p, g.shape) for p, g in zip(parts, like)]
