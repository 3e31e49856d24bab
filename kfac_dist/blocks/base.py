"""The curvature block: the unit the optimizer sees, with its approximation and its inversion.

A block is a group of variables preconditioned together. Every block answers
the same questions: which factors it keeps (`factor_shapes`), their batch
statistics from what the forward and backward passes recorded
(`statistics`), the payload of one factor for a damping (`invert`), and how
to precondition its gradients (`precondition`). The answers come from its
approximation (`approximations/`) and the inverse method
(`inverse_methods/`); a layer kind (a subclass) says only what it records
and how its variables map onto the block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kfac_dist import grouping, linalg
from kfac_dist.blocks.approximations import APPROXIMATION_OF, Approximation
from kfac_dist.blocks.inverse_methods import InverseMethod, Payload, inverse_method
from kfac_dist.blocks.records import Record
from kfac_dist.options import (  # noqa: F401  (the block kinds' vocabulary)
    APPROXIMATIONS,
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    INVERSE_METHODS,
    KRON,
)


class Block:
    """A group of variables with one curvature approximation."""

    #: approximations this block kind supports, the first is the default: all
    #: registered ones for a kind with both the Kronecker and the per-example
    #: interface; a kind that has less names what it supports.
    approximations: tuple[str, ...] = tuple(APPROXIMATION_OF)

    def __init__(self, name: str, variables: Sequence[Any], approx: str | None = None):
        self.name = name
        self.variables = list(variables)
        self.approx = approx or self.approximations[0]
        if self.approx not in self.approximations:
            raise ValueError(
                f"fisher_approx={self.approx!r} is not available for block "
                f"'{name}' ({type(self).__name__}); it supports {self.approximations}."
            )
        self.approximation: Approximation = APPROXIMATION_OF[self.approx]()

    # --- what a layer kind defines: what it records --------------------------
    @property
    def layer(self) -> Any:
        """The Keras layer whose calls this block records, or None."""
        return None

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        """Calls the layer, returns (output, Record); only for layer blocks."""
        raise NotImplementedError

    # --- ... and how its variables map onto the block: the Kronecker interface
    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        """Shapes of the Kronecker factors: (input factor shape, output dim)."""
        raise NotImplementedError

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """The batch's Kronecker factors [A, G] (see `records.kron_factors`)."""
        raise NotImplementedError

    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        """The block's gradients as one (input side, output side) matrix."""
        raise NotImplementedError

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        """Inverse of `gradient_matrix`: one tensor per variable."""
        raise NotImplementedError

    # --- ... the per-example interface ---------------------------------------
    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        """(C·b, num_params): each example's gradients per output column, variables in order."""
        raise NotImplementedError

    # --- what every block answers, through its approximation ------------------
    @property
    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in self.variables)

    def factor_shapes(self) -> list[tuple[int, ...]]:
        return self.approximation.factor_shapes(self)

    def factor_names(self) -> list[str]:
        return self.approximation.factor_names()

    def weighted_factors(self) -> list[bool]:
        """Which factors carry the sample weights (divided by the mean weight when read)."""
        return self.approximation.weighted_factors()

    def statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """Batch statistics of each factor (means over the local batch).

        `example_weights` (b,), the sample weights, weight a Kronecker block's
        input factor: Σ_i w_i ā ā ᵀ / b (the curvature divides it by the mean
        weight; the output side carries w through the pseudo-loss). Per-example
        statistics carry w through the pseudo-loss alone.
        """
        return self.approximation.statistics(
            self, records, output_grads, batch_size, example_weights
        )

    def invert(
        self,
        index: int,
        factors: Sequence[tf.Tensor],
        damping: tf.Tensor | float,
        method: str | InverseMethod,
    ) -> tuple[list[tf.Tensor], tf.Tensor]:
        """Payload of factor `index`: its damped inverse, or (eigenvalues, eigenvectors).

        Returns (payload tensors, retries); see `invert_factors`.
        """
        means = tf.stack([linalg.mean_eigenvalue(f) for f in factors])
        dampings = factor_dampings([self], means, damping)
        payloads, retries = invert_factors([factors[index]], dampings[index : index + 1], method)
        return payloads[0], retries[0]

    def payload_shapes(self, method: str | InverseMethod) -> list[list[tuple[int, ...]]]:
        """Shapes of `invert`'s payload for each factor."""
        inverse = inverse_method(method)
        return [inverse.payload_shapes(shape) for shape in self.factor_shapes()]

    def precondition(
        self,
        grads: Sequence[tf.Tensor],
        payloads: Sequence[Payload],
        damping: tf.Tensor,
        method: str | InverseMethod,
    ) -> list[tf.Tensor]:
        """F̂⁻¹ applied to the block's gradients (one tensor per variable)."""
        return self.approximation.precondition(
            self, grads, payloads, damping, inverse_method(method)
        )


def factor_dampings(
    blocks: Sequence[Block], mean_eigenvalues: tf.Tensor, damping: tf.Tensor | float
) -> tf.Tensor:
    """The damping added to each factor of `blocks` (in factor order) before a Cholesky inverse.

    Each approximation spreads λ over its factors (`Approximation.factor_dampings`):
    Kronecker factors get the factored Tikhonov damping (π√λ on A, √λ/π on
    G, π from the factors' `mean_eigenvalues`); diagonal and full blocks get
    λ. The blocks of one approximation are done together: a few ops per
    approximation whatever the number of blocks.
    """
    kinds: dict[type[Approximation], tuple[Approximation, list[list[int]]]] = {}
    position = 0
    for block in blocks:
        count = len(block.factor_names())
        _, positions = kinds.setdefault(type(block.approximation), (block.approximation, []))
        positions.append(list(range(position, position + count)))
        position += count
    if not kinds:
        return tf.fill([0], tf.cast(damping, mean_eigenvalues.dtype))
    parts, order = [], []
    for approximation, positions in kinds.values():
        index = np.array(positions, np.int32)  # (blocks, factors per block)
        dampings = approximation.factor_dampings(tf.gather(mean_eigenvalues, index), damping)
        parts.append(tf.reshape(dampings, [-1]))
        order.append(index.reshape(-1))
    flat = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
    source = np.argsort(np.concatenate(order), kind="stable").astype(np.int32)
    if np.array_equal(source, np.arange(position)):
        return flat
    return tf.gather(flat, source)


def invert_factors(
    factors: Sequence[tf.Tensor],
    dampings: tf.Tensor | None,
    method: str | InverseMethod,
) -> tuple[list[list[tf.Tensor]], list[tf.Tensor]]:
    """The payloads of many factors, and each one's retries (int32).

    Cholesky: the inverse of each factor plus its damping (`dampings`, one
    per factor, see `factor_dampings`). Eigen: the eigendecomposition only
    (`dampings` unused, may be None); the exact damping is applied when
    preconditioning, so a new damping takes effect at once. Factors of
    equal shape share one batched op (and one retry loop), while each
    factor keeps its own damping and retries.
    """
    inverse = inverse_method(method)
    payloads: list[list[tf.Tensor]] = [[] for _ in factors]
    retries: list[tf.Tensor] = [tf.constant(0, tf.int32)] * len(factors)
    for group in grouping.shape_groups(factors):
        members = [factors[p] for p in group]
        group_dampings = (
            tf.gather(dampings, group)
            if inverse.needs_factor_damping and dampings is not None
            else None
        )
        group_payloads, group_retries = inverse.invert(members, group_dampings)
        for p, payload, tries in zip(group, group_payloads, group_retries):
            payloads[p], retries[p] = payload, tries
    return payloads, retries
