"""The interface every curvature approximation answers, and what it asks of a layer kind.

An approximation is the structure of a block's Fisher: which factors it
keeps, their batch statistics, how the damping is spread over them, and how
their payloads precondition the block's gradients. It reads the layer
through `LayerKind`: a Kronecker-factored approximation through the
layer's Kronecker interface, a per-example one through its per-example
gradients. Approximations hold no state: one instance serves every block.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import ClassVar, Protocol

import tensorflow as tf

from kfac_dist.blocks.inverse_methods import InverseMethod, Payload
from kfac_dist.blocks.records import Record


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
    def factor_names(self) -> list[str]:
        """One name per factor (in variable and unit names)."""

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

    def weighted_factors(self) -> list[bool]:
        """Which factors carry the sample weights (the curvature divides them by the mean weight).

        None by default: per-example statistics carry the weights through
        the pseudo-loss alone.
        """
        return [False] * len(self.factor_names())

    def factor_dampings(self, mean_eigenvalues: tf.Tensor, damping: tf.Tensor | float) -> tf.Tensor:
        """The damping of each factor of k blocks of this approximation, before inversion.

        `mean_eigenvalues` (k, factors per block), tr(F)/dim(F) of each
        factor; returns the same shape. By default every factor gets λ.
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
        return [self.second_moment(per_example, tf.cast(batch_size, per_example.dtype))]

    @abc.abstractmethod
    def second_moment(self, per_example: tf.Tensor, batch_size: tf.Tensor) -> tf.Tensor:
        """(1/b) Σ ĝ ĝᵀ, or its diagonal, of the (C·b, n) per-example gradients."""

    def precondition(
        self,
        layer: LayerKind,
        grads: Sequence[tf.Tensor],
        payloads: Sequence[Payload],
        damping: tf.Tensor,
        method: InverseMethod,
    ) -> list[tf.Tensor]:
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], axis=0)
        return split_flat(method.solve(payloads[0], flat, damping), grads)


def split_flat(flat: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """A flat vector cut into tensors shaped as `like`, in order."""
    sizes = [int(g.shape.num_elements()) for g in like]
    parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
    return [tf.reshape(p, g.shape) for p, g in zip(parts, like)]
