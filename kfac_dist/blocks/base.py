"""The curvature block: the unit the optimizer sees, with its approximation and its inversion.

A block is a group of variables preconditioned together. Every block answers
the same questions: which factors it keeps (`factor_shapes`), their batch
statistics from what the forward and backward passes recorded
(`statistics`), the payload of one factor for a damping (`invert`), and how
to precondition its gradients (`precondition`). The answers come from its
approximation (`approximations/`) and the inverse method
(`inverse_methods/`); a layer kind (a subclass) says only what it records
and how its variables map onto the block.

A factor may be grouped (`group_counts`): g equal-sized members stored on
a leading axis, one variable and one placement unit for all of them, while
damping and inversion are per member. A factor larger than the block's
`max_factor_dim` may be split (`factor_splits`): kept as a grouped factor of
its diagonal blocks, which are damped as blocks of the whole factor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kfac_dist import grouping, linalg
from kfac_dist.blocks.approximations import APPROXIMATION_OF, Approximation, KronPart
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
    #: The bound on a factor's side: a matrix factor larger than it is split
    #: into diagonal blocks no larger (None: no bound). Registration sets it
    #: from `Kfac(max_factor_dim=...)`, before the factors are made.
    max_factor_dim: int | None = None

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

    # --- ... with several or grouped Kronecker pairs (a kind that has them) ------
    def kron_parts(self) -> list[KronPart] | None:
        """The Kronecker pairs, when not the one ungrouped pair of `kron_dims` (None).

        A kind that returns parts has `kron_statistics` return [A, G] per
        part (a grouped part's batched, (g, ...)), and maps its variables
        through `gradient_matrices` and `split_matrices`.
        """
        return None

    def gradient_matrices(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """One gradient matrix per part: (in, out), or (g, in, out) for a grouped part."""
        raise NotImplementedError

    def split_matrices(self, matrices: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """Inverse of `gradient_matrices`: one tensor per variable."""
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
        return self.approximation.factor_names(self)

    def group_counts(self) -> list[int | None]:
        """Each factor's number of groups: g members on a leading axis, or None (not grouped)."""
        return self.approximation.group_counts(self)

    def factor_splits(self) -> list[linalg.Split | None]:
        """Each factor's split into diagonal blocks under `max_factor_dim` (None: kept whole)."""
        return self.approximation.factor_splits(self)

    def member_counts(self) -> list[int]:
        """Each factor's number of members (1 for a factor that is not grouped)."""
        return [linalg.member_count(groups) for groups in self.group_counts()]

    def damping_rows(self) -> list[list[int]]:
        """Members whose dampings are computed together (see `Approximation.damping_rows`)."""
        return self.approximation.damping_rows(self)

    def weighted_factors(self) -> list[bool]:
        """Which factors carry the sample weights (divided by the mean weight when read)."""
        return self.approximation.weighted_factors(self)

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
        groups = self.group_counts()
        means = tf.concat(
            [linalg.mean_eigenvalues(linalg.members(f, g)) for f, g in zip(factors, groups)],
            axis=0,
        )
        dampings = factor_dampings([self], means, damping)
        start = sum(self.member_counts()[:index])
        count = self.member_counts()[index]
        payloads, retries = invert_factors(
            [factors[index]], dampings[start : start + count], method, [groups[index]]
        )
        return payloads[0], retries[0]

    def payload_shapes(self, method: str | InverseMethod) -> list[list[tuple[int, ...]]]:
        """Shapes of `invert`'s payload for each factor."""
        inverse = inverse_method(method)
        return [
            inverse.payload_shapes(shape, groups)
            for shape, groups in zip(self.factor_shapes(), self.group_counts())
        ]

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
    """The damping added to each member of `blocks`' factors before a Cholesky inverse.

    `mean_eigenvalues` and the result are in member order: factor by factor,
    a grouped factor's g members in order (for factors that are not
    grouped, factor order). Each approximation spreads λ over its factors
    (`Approximation.factor_dampings`): Kronecker pairs get the factored
    Tikhonov damping (π√λ on A, √λ/π on G, π from the pair's
    `mean_eigenvalues`, each member pair its own); diagonal and full blocks
    get λ. The blocks of one approximation are done together: a few ops per
    approximation whatever the number of blocks or members.
    """
    kinds: dict[type[Approximation], tuple[Approximation, list[list[int]]]] = {}
    position = 0
    # Members of split factors: each gets its whole factor's tr(F)/dim(F).
    segments: list[np.ndarray] = []
    scales: list[np.ndarray] = []
    for block in blocks:
        _, rows = kinds.setdefault(type(block.approximation), (block.approximation, []))
        rows.extend([position + p for p in row] for row in block.damping_rows())
        for count, split in zip(block.member_counts(), block.factor_splits()):
            members = np.arange(position, position + count)
            if split is None:
                segments.append(members)
                scales.append(np.ones(count))
            else:
                segments.append(np.full(count, position))
                scales.append(np.full(count, split.size / split.dim))
            position += count
    if not kinds:
        return tf.fill([0], tf.cast(damping, mean_eigenvalues.dtype))
    if position and any(np.any(s != 1.0) for s in scales):
        mean_eigenvalues = _whole_factor_means(
            mean_eigenvalues, np.concatenate(segments), np.concatenate(scales)
        )
    parts, order = [], []
    for approximation, rows in kinds.values():
        index = np.array(rows, np.int32)  # (rows, members per row)
        dampings = approximation.factor_dampings(tf.gather(mean_eigenvalues, index), damping)
        parts.append(tf.reshape(dampings, [-1]))
        order.append(index.reshape(-1))
    flat = parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)
    # A member in several rows (of a split pair) takes its first row's damping:
    # all of them give it the same.
    members, source = np.unique(np.concatenate(order), return_index=True)
    if not np.array_equal(members, np.arange(position)):
        raise ValueError("The damping rows must cover every member of the blocks' factors.")
    if np.array_equal(source, np.arange(position)):
        return flat
    return tf.gather(flat, source.astype(np.int32))


def _whole_factor_means(
    member_means: tf.Tensor, segments: np.ndarray, scales: np.ndarray
) -> tf.Tensor:
    """Each member's mean eigenvalue as its factor's: Σ_i tr(F_i) / n over a split factor's blocks.

    `segments` gives each member its factor's first member (its own
    position when not split), `scales` m/n for a split factor's members
    (m·tr(F_i)/m summed, over the true side n, not the padded k·m), 1 else.
    """
    count = len(segments)
    scaled = member_means * tf.constant(scales, member_means.dtype)
    sums = tf.math.unsorted_segment_sum(scaled, tf.constant(segments, tf.int32), count)
    return tf.gather(sums, tf.constant(segments, tf.int32))


def invert_factors(
    factors: Sequence[tf.Tensor],
    dampings: tf.Tensor | None,
    method: str | InverseMethod,
    groups: Sequence[int | None] | None = None,
    max_stack_bytes: int | None = None,
) -> tuple[list[list[tf.Tensor]], list[tf.Tensor]]:
    """The payloads of many factors, and each one's retries (int32).

    Cholesky: the inverse of each factor plus its damping (`dampings`, one
    per member, in member order, see `factor_dampings`). Eigen: the
    eigendecomposition only (`dampings` unused, may be None); the exact
    damping is applied when preconditioning, so a new damping takes effect
    at once. `groups` gives each factor's number of groups (default: none
    is grouped). Members of equal shape, whether of grouped factors or not,
    share one batched op (and one retry loop), while each keeps its own
    damping and retries; a grouped factor's retries are its members'.
    With `max_stack_bytes`, a batched op stacks at most that many bytes of
    factors (a larger factor goes alone), and the stacks go one after the
    other: the inversion's temporaries (a few copies of a stack) stay
    bounded however many factors are inverted at once.
    """
    inverse = inverse_method(method)
    groups = [None] * len(factors) if groups is None else list(groups)
    counts = [linalg.member_count(g) for g in groups]
    starts = np.cumsum([0, *counts])
    payloads: list[list[tf.Tensor]] = [[] for _ in factors]
    retries: list[tf.Tensor] = [tf.constant(0, tf.int32)] * len(factors)
    keys = [
        (linalg.member_shape(tuple(f.shape), g), tf.as_dtype(f.dtype))
        for f, g in zip(factors, groups)
    ]
    previous: list[tf.Tensor] = []
    for same_shape in grouping.groups_of(keys):
        sizes = [int(np.prod(factors[p].shape)) * factors[p].dtype.size for p in same_shape]
        for chunk in grouping.chunks_by_bytes(sizes, max_stack_bytes):
            group = [same_shape[i] for i in chunk]
            with tf.control_dependencies(previous):
                stacks, tries = _invert_group(factors, group, groups, dampings, starts, inverse)
            previous = [*stacks, tries]
            sizes_of = [counts[p] for p in group]
            grouped = any(groups[p] is not None for p in group)
            pieces = [_split_members(t, sizes_of, grouped) for t in stacks]
            for i, (p, group_tries) in enumerate(
                zip(group, _split_members(tries, sizes_of, grouped))
            ):
                shapes = inverse.payload_shapes(tuple(factors[p].shape), groups[p])
                payloads[p] = [tf.reshape(piece[i], shape) for piece, shape in zip(pieces, shapes)]
                retries[p] = tf.reduce_sum(group_tries) if grouped else group_tries
    return payloads, retries


def _invert_group(
    factors: Sequence[tf.Tensor],
    group: Sequence[int],
    groups: Sequence[int | None],
    dampings: tf.Tensor | None,
    starts: np.ndarray,
    inverse: InverseMethod,
) -> tuple[list[tf.Tensor], tf.Tensor]:
    """One batched inversion of the (members of the) factors at positions `group`."""
    if any(groups[p] is not None for p in group):
        stack = tf.concat([linalg.members(factors[p], groups[p]) for p in group], axis=0)
    else:
        stack = tf.stack([factors[p] for p in group])
    group_dampings = None
    if inverse.needs_factor_damping and dampings is not None:
        members = np.concatenate([np.arange(starts[p], starts[p + 1]) for p in group])
        group_dampings = tf.gather(dampings, members.astype(np.int32))
    return inverse.invert_stack(stack, group_dampings)


def _split_members(stack: tf.Tensor, sizes: Sequence[int], grouped: bool) -> list[tf.Tensor]:
    """A stack of members cut into each factor's (a factor not grouped: its only member).

    A tensor of no elements (the identity eigenvectors left out) is every
    factor's as it is.
    """
    if stack.shape.num_elements() == 0:
        return [stack] * len(sizes)
    if not grouped:
        return tf.unstack(stack, num=len(sizes))
    return tf.split(stack, sizes, axis=0) if len(sizes) > 1 else [stack]
