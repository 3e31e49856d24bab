"""The curvature state of all blocks: factor averages, sync, owned inverses, sharing.

Each replica folds its own batch statistics into local sums weighted by the
examples it saw: S_r ← ε S_r + (1-ε) b_r F_r and W_r ← ε W_r + (1-ε) b_r.
The factor is S/W with S = Σ_r S_r, W = Σ_r W_r: the debiased moving average
of the global-batch statistics (W starts at zero, so dividing by it is the
1-εᵗ correction). A replica with no examples folds zeros with zero weight,
so its sums still decay. Whether a batch is folded is decided on values
every replica shares (the gradient all-reduce carries each replica's
finiteness flag), so all replicas fold the same batches. Summing is linear,
so syncing only on inverse updates is exact; after a sync every replica
holds S/N, W/N, so a second sync changes nothing. A placement plan names
one owner per factor; owners invert, and one sharing phase (an all-reduce,
an all-gather, or one broadcast per owner) brings every result to every
replica.

A grouped factor (g equal members on a leading axis, `Block.group_counts`)
is one variable, one sum, one payload and one placement unit; its members
are damped, inverted (in the same batched ops as other members of their
shape), checked and kept apart, one by one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias, cast

import keras
import numpy as np
import tensorflow as tf

from kfac_dist import grouping, linalg
from kfac_dist.blocks import CHOLESKY, Block, factor_dampings, inverse_method, invert_factors
from kfac_dist.distributed_preconditioning import DistributedBlocks
from kfac_dist.linalg import curvature_dtype
from kfac_dist.options import EVERY_UPDATE, FACTOR_SYNC_MODES, LAZY
from kfac_dist.placement import (
    FlopCostModel,
    InversionUnit,
    PlacementPlan,
    PlacementPolicy,
    Sharing,
    inverse_sharing,
    make_plan,
)
from kfac_dist.strategies import FACTOR_SYNC, INVERSE_SHARE, CrossReplicaContext

#: Each factor's payload tensors, in factor order.
Payloads: TypeAlias = "list[list[tf.Tensor]]"
#: `add_variable(shape, name, dtype=None)`: creates one piece of per-replica state.
AddVariable: TypeAlias = Callable[..., Any]
#: λ, as a tensor or a number.
Damping: TypeAlias = "tf.Tensor | float"


def _all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def inversion_units(blocks: Sequence[Block]) -> list[InversionUnit]:
    """One placement unit per factor, block by block (A then G); a grouped factor is one unit."""
    units = []
    for block in blocks:
        for factor_name, shape, groups in zip(
            block.factor_names(), block.factor_shapes(), block.group_counts()
        ):
            member = linalg.member_shape(shape, groups)
            units.append(
                InversionUnit(
                    name=f"{block.name}/{factor_name}",
                    block=block.name,
                    dim=member[0],
                    kind="diagonal" if len(member) == 1 else "matrix",
                    groups=linalg.member_count(groups),
                )
            )
    return units


class BatchStatistics(NamedTuple):
    """One replica's batch statistics between the train step and the fold."""

    statistics: list[tf.Tensor]  # means over the local batch, one per factor
    weights: tf.Tensor  # [examples, sum of sample weights]
    finite: tf.Tensor  # whether every statistic is finite (local)


class Curvature:
    """Factor statistics and inverses of a list of blocks, on every replica."""

    def __init__(
        self,
        blocks: Sequence[Block],
        context: CrossReplicaContext,
        *,
        inverse_method: str,
        placement: str | PlacementPolicy,
        cov_ema_decay: float,
        factor_sync: str = LAZY,
        sharing: str = "auto",
        sync_chunk_bytes: int | None = None,
        stagger_period: int = 1,
        inverse_replication: float = 1.0,
    ):
        self.blocks = list(blocks)
        self.context = context
        self.inverse_method = inverse_method
        self.cov_ema_decay = cov_ema_decay
        self.factor_sync = factor_sync
        self.sharing_choice = sharing
        self.sync_chunk_bytes = sync_chunk_bytes
        self.units = inversion_units(self.blocks)
        factor_shapes = [shape for block in self.blocks for shape in block.factor_shapes()]
        self.factor_shapes = factor_shapes
        # Each factor's number of groups (None: not grouped), and where its
        # members start in member order (dampings are per member).
        self._groups = [g for block in self.blocks for g in block.group_counts()]
        self._member_starts = np.cumsum([0, *map(linalg.member_count, self._groups)])
        # Factors of one shape are folded, synced and inverted as one stack; a
        # grouped factor never shares a stack with one that is not (a (g, n)
        # stack of diagonal members is not an (n, n) matrix).
        self.factor_groups = grouping.groups_of(
            [(shape, g is not None) for shape, g in zip(factor_shapes, self._groups)]
        )
        # Factors whose statistics carry the sample weights (Kronecker input factors).
        self._weighted = [
            weighted for block in self.blocks for weighted in block.weighted_factors()
        ]
        self.plan: PlacementPlan = make_plan(
            self.units,
            context.num_replicas,
            placement,
            cost_model=FlopCostModel(inverse_method),
            # One slot per step of the period, but never more than units:
            # the steps past the last slot invert nothing.
            num_slots=max(1, min(stagger_period, len(self.units))),
        )
        #: Each unit's payload shapes under the inverse method.
        self.payload_shapes = [
            shapes for block in self.blocks for shapes in block.payload_shapes(self.inverse_method)
        ]
        # Distributed blocks: both factors owned by the block's owner, never shared.
        self.distributed = DistributedBlocks(self, inverse_replication)
        if self.distributed.active:
            owners = list(self.plan.owners)
            for unit, owner in self.distributed.unit_owners.items():
                owners[unit] = owner
            self.plan = dataclasses.replace(self.plan, owners=tuple(owners))

    # --- state ------------------------------------------------------------
    def build(self, add_variable: AddVariable) -> None:
        """Creates the state with `add_variable(shape, name, dtype)` (per-replica)."""
        self.factor_sums = [
            add_variable(shape, f"{block.name}_{name}_sum")
            for block in self.blocks
            for name, shape in zip(block.factor_names(), block.factor_shapes())
        ]
        # Moving sums of [examples, sample weights], as the factors are folded.
        self.weight_sum = add_variable((2,), "weight_sum")
        # A distributed unit's payloads live in its owner's buffer, not here.
        names = [f"{block.name}_{name}" for block in self.blocks for name in block.factor_names()]
        self.payloads = [
            []
            if unit in self.distributed.unit_owners
            else [add_variable(s, f"{name}_inv{i}") for i, s in enumerate(shapes)]
            for unit, (name, shapes) in enumerate(zip(names, self.payload_shapes))
        ]
        if self.distributed.active:
            self.distributed.build()
        self.skipped_statistics = add_variable((), "skipped_statistics", "int64")
        self.inversions = add_variable((), "inversions_computed", "int64")
        self.inversion_retries = add_variable((), "inversion_retries", "int64")
        # Inverse updates that kept the previous inverse (no well-conditioned retry).
        self.inversion_failures = add_variable((), "inversion_failures", "int64")

    def _stack_groups(self, group: Sequence[int]) -> int | None:
        """The number of groups of every factor in one stack of `factor_groups`."""
        return self._groups[group[0]]

    def _is_matrix(self, group: Sequence[int]) -> bool:
        """Whether a stack's factors (or their members) are matrices, not diagonals."""
        shape = self.factor_sums[group[0]].shape
        return len(linalg.member_shape(shape, self._stack_groups(group))) == 2

    def _members_of(self, factors: Sequence[int]) -> np.ndarray:
        """The member positions of `factors`, in order."""
        starts = self._member_starts
        if not factors:
            return np.zeros([0], np.int32)
        return np.concatenate([np.arange(starts[f], starts[f + 1]) for f in factors]).astype(
            np.int32
        )

    def block_factor_slices(self) -> list[slice]:
        """Each block's factors (and units), as a slice of the factor order."""
        starts = np.cumsum([0, *(len(block.factor_names()) for block in self.blocks)])
        return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]

    def needs_inverses(self) -> tf.Tensor:
        """Whether every inverse must be computed at this step, whatever the schedule.

        Only distributed inverses can be missing (they are not saved: a
        restored job recomputes them); the answer is the same on every replica.
        """
        if not self.distributed.active:
            return tf.constant(False)
        return self.distributed.needs_inverses()

    # --- statistics -----------------------------------------------------------
    def batch_statistics(
        self,
        statistics: Sequence[tf.Tensor],
        batch_size: tf.Tensor,
        weight_total: tf.Tensor | None = None,
    ) -> BatchStatistics:
        """One batch's statistics (flat, in factor order), ready to fold.

        `weight_total` is the batch's sum of sample weights (default: b); the
        Kronecker input factors are divided by the mean weight it gives. A
        replica with no examples contributes zero statistics and zero weight
        (its means are 0/0), so that its sums still decay: ΣS/ΣW is then the
        moving average of the global batch whatever the split.
        """
        b = tf.cast(batch_size, curvature_dtype())
        weights = tf.stack([b, b if weight_total is None else tf.cast(weight_total, b.dtype)])
        has_examples = b > 0
        cast = [tf.cast(s, b.dtype) for s in statistics]
        cast = [tf.where(has_examples, s, tf.zeros_like(s)) for s in cast]
        return BatchStatistics(cast, weights, _all_finite(cast))

    def empty_statistics(self) -> BatchStatistics:
        """What a step without statistics hands to `fold` (never folded)."""
        dtype = curvature_dtype()
        zeros = [tf.zeros(s.shape, dtype) for s in self.factor_sums]
        return BatchStatistics(zeros, tf.zeros([2], dtype), tf.constant(True))

    def fold(self, batch: BatchStatistics, apply: tf.Tensor) -> None:
        """S ← εS + (1-ε)·b·F_batch and W ← εW + (1-ε)·[b, Σw] where `apply` holds.

        `apply` must be identical on every replica (the caller decides it on
        all-reduced values), so a non-finite batch on one replica leaves every
        replica's sums as they were. The batch is validated before it is
        folded, so no copy of the sums is kept to fall back on; factor by
        factor, so the step holds one folded factor at a time. A fold that
        would overflow a finite sum keeps that sum (and counts in
        `skipped_statistics`).
        """
        decay = tf.constant(self.cov_ema_decay, curvature_dtype())
        b = batch.weights[0]

        def fold() -> tf.Operation:
            overflows = []
            for total, statistic in zip(self.factor_sums, batch.statistics):
                folded = decay * total + ((1.0 - decay) * b) * statistic
                finite = tf.reduce_all(tf.math.is_finite(folded))
                total.assign(tf.where(finite, folded, total))
                overflows.append(tf.logical_not(finite))
            self.weight_sum.assign(decay * self.weight_sum + (1.0 - decay) * batch.weights)
            self.skipped_statistics.assign_add(tf.cast(tf.reduce_any(overflows), tf.int64))
            return tf.no_op()

        tf.cond(apply, fold, tf.no_op)
        if self.factor_sync == EVERY_UPDATE:
            self.sync()

    def sync(self, factors: Sequence[int] | None = None) -> tf.Tensor:
        """All-reduces the local sums of `factors` (default: all); returns whether finite.

        Symmetric factors travel as triangles, packed into chunks of at most
        `sync_chunk_bytes` (a factor larger than that travels alone), one
        collective per chunk, one chunk after the other: the transient
        buffers stay bounded whatever the model. A chunk whose sum is not
        finite (seen identically by every replica) leaves each replica's
        local sums as they were: their total is unchanged, so nothing is
        lost but this sync, and no copy of the sums is needed to fall back on.
        """
        indices = list(range(len(self.factor_sums))) if factors is None else list(factors)
        return self._sync(indices, [])[0]

    def _sync(
        self, factors: list[int], extras: list[tf.Tensor]
    ) -> tuple[tf.Tensor, list[tf.Tensor]]:
        """`sync(factors)`; `extras` ride in the first chunk, returned as every replica's mean."""
        if self.context.num_replicas == 1:
            # Nothing to exchange: the sums are the global sums, finite by `fold`.
            sums = [self.factor_sums[f] for f in factors] + [self.weight_sum]
            return _all_finite([*sums, *extras]), extras
        share = 1.0 / self.context.num_replicas
        finite_chunks: list[tf.Tensor] = []
        extras_mean: list[tf.Tensor] = []
        previous: list[tf.Operation] = []
        for chunk in self._sync_chunks(factors):
            # One chunk at a time: the next is packed only once this one is written.
            with tf.control_dependencies(previous):
                variables = [self.factor_sums[f] for f in chunk]
                wire = [self._to_triangles(f, v.value) for f, v in zip(chunk, variables)]
                first = not finite_chunks
                if first:
                    variables.append(self.weight_sum)
                    wire.extend([self.weight_sum.value, *extras])
                summed = self.context.all_reduce_sum(wire, FACTOR_SYNC)
                finite = _all_finite(summed)
                writes = []
                for position, variable in enumerate(variables):
                    value = summed[position]
                    if position < len(chunk):
                        value = self._from_triangles(chunk[position], value)
                    writes.append(variable.assign(tf.where(finite, value * share, variable)))
                if first:
                    extras_mean = [v * share for v in summed[len(variables) :]]
            previous = writes
            finite_chunks.append(finite)
        finite = tf.reduce_all(finite_chunks)
        self.skipped_statistics.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        return finite, extras_mean

    def _sync_chunks(self, factors: Sequence[int]) -> list[list[int]]:
        """`factors` in order, cut into chunks of at most `sync_chunk_bytes` on the wire."""
        factors = list(factors)
        itemsize = curvature_dtype().size
        sizes = [self._wire_floats(f) * itemsize for f in factors]
        chunks = grouping.chunks_by_bytes(sizes, self.sync_chunk_bytes)
        return [[factors[i] for i in chunk] for chunk in chunks]

    @property
    def largest_sync_chunk_bytes(self) -> int:
        """The bytes of the factor sync's largest chunk (its weights included)."""
        itemsize = curvature_dtype().size
        chunks = self._sync_chunks(range(len(self.factor_sums)))
        sizes = [sum(self._wire_floats(f) for f in chunk) for chunk in chunks]
        sizes[0] += int(np.prod(self.weight_sum.shape))
        return max(sizes) * itemsize

    def _wire_floats(self, factor: int) -> int:
        shape = self.factor_sums[factor].shape
        if self._is_matrix([factor]):
            return linalg.member_count(self._groups[factor]) * linalg.triangle_size(shape[-1])
        return int(np.prod(shape))

    def _to_triangles(self, factor: int, value: tf.Tensor) -> tf.Tensor:
        return linalg.pack_symmetric(value) if self._is_matrix([factor]) else value

    def _from_triangles(self, factor: int, value: tf.Tensor) -> tf.Tensor:
        if not self._is_matrix([factor]):
            return value
        return linalg.unpack_symmetric(value, self.factor_sums[factor].shape[-1])

    def factors(self, indices: Sequence[int] | None = None) -> list[tf.Tensor]:
        """The synced factors S/W of `indices` (default: all), valid right after a sync.

        Factors that carry the sample weights (`Block.weighted_factors`: the
        Kronecker input factors) are also divided by the mean sample weight:
        with the weights on G through the pseudo-loss, A ⊗ G is then the
        weighted GGN (exact for a linear layer under weighted MSE). Only the
        factors asked for are read.
        """
        examples, weights = tf.unstack(self.weight_sum.value)
        examples = tf.maximum(examples, 1e-30)
        mean_weight = tf.where(weights > 0, weights / examples, tf.ones_like(weights))
        indices = range(len(self.factor_sums)) if indices is None else indices
        return [
            self.factor_sums[f] / (examples * mean_weight if self._weighted[f] else examples)
            for f in indices
        ]

    def _mean_eigenvalues(self, diagonal_means: tf.Tensor | None = None) -> tf.Tensor:
        """Each member's tr(F)/dim(F), in member order.

        Read from the sums' diagonals (a few floats per member, no factor
        copied); `diagonal_means` are those of the global sums when the
        factors were not all synced (staggered updates), else the local ones
        serve (after a full sync every replica holds S/N and W/N).
        """
        if diagonal_means is None:
            diagonal_means = self._local_diagonal_means()
        examples, weights = tf.unstack(self.weight_sum.value)
        examples = tf.maximum(examples, 1e-30)
        mean_weight = tf.where(weights > 0, weights / examples, tf.ones_like(weights))
        weighted = np.concatenate(
            [[self._weighted[f]] * linalg.member_count(g) for f, g in enumerate(self._groups)]
        )
        scale = tf.where(tf.constant(weighted.astype(bool)), examples * mean_weight, examples)
        return diagonal_means / scale

    def _local_diagonal_means(self) -> tf.Tensor:
        """The mean of each member's diagonal of this replica's sums, in member order."""
        means = []
        for total, groups in zip(self.factor_sums, self._groups):
            members = linalg.members(total.value, groups)
            diagonals = members if members.shape.rank == 2 else tf.linalg.diag_part(members)
            means.append(tf.reduce_mean(diagonals, axis=-1))
        return tf.concat(means, axis=0)

    def _dampings(self, damping: Damping, diagonal_means: tf.Tensor | None = None) -> tf.Tensor:
        """Each member's Cholesky damping (see `blocks.factor_dampings`), in member order."""
        return factor_dampings(self.blocks, self._mean_eigenvalues(diagonal_means), damping)

    # --- inverses ---------------------------------------------------------------
    def update_inverses(self, damping: Damping, slot: tf.Tensor | None = None) -> None:
        """Syncs (unless synced on every update), then inverts and shares.

        `slot` (staggered updates, see `PlacementPlan.slots`): the step of
        the inverse period; only the units of that slot (none past the last
        slot), or every unit when it is negative (the first step). Each slot
        syncs its own factors, with the diagonals of every factor riding
        along (the dampings need every pair's traces), then inverts and
        shares its own units.
        """
        if slot is None:
            self._update_units(list(range(len(self.units))), damping, staggered=False)
            return
        branches = [
            functools.partial(self._update_units, self.plan.in_slot(s), damping, staggered=True)
            for s in range(self.plan.num_slots)
        ]
        everything = list(range(len(self.units)))
        branches.append(tf.no_op)  # a step past the last slot
        branches.append(functools.partial(self._update_units, everything, damping, staggered=False))
        slots = self.plan.num_slots
        slot = tf.cast(slot, tf.int32)
        branch = tf.where(slot < 0, slots + 1, tf.minimum(slot, slots))
        tf.switch_case(branch, branches)

    def _update_units(self, units: list[int], damping: Damping, staggered: bool) -> tf.Operation:
        if self.factor_sync == EVERY_UPDATE:
            finite, diagonal_means = tf.constant(True), None
        elif staggered:
            finite, diagonal_means = self._sync_with_diagonals(units)
        else:
            finite, diagonal_means = self.sync(units), None
        tf.cond(finite, lambda: self._invert_and_share(units, damping, diagonal_means), tf.no_op)
        return tf.no_op()

    def _sync_with_diagonals(self, factors: list[int]) -> tuple[tf.Tensor, tf.Tensor]:
        """`sync(factors)`, with every factor's diagonal means summed in the same collective."""
        finite, (means,) = self._sync(factors, [self._local_diagonal_means()])
        return finite, means

    def _invert_and_share(
        self, units: list[int], damping: Damping, diagonal_means: tf.Tensor | None
    ) -> tf.Operation:
        replica = self.context.replica_id()
        payloads = self.owned_payloads(damping, replica, units, diagonal_means=diagonal_means)
        distributed = self.distributed.unit_owners
        replicated = [u for u in units if u not in distributed]
        self.install(self.share(payloads, replicated), replicated)
        if self.distributed.active:
            self.distributed.hold(payloads, [u for u in units if u in distributed], replica)
        return tf.no_op()

    def owned_payloads(
        self,
        damping: Damping,
        replica: tf.Tensor | int,
        units: Sequence[int] | None = None,
        diagonal_means: tf.Tensor | None = None,
    ) -> Payloads:
        """The payload of each of `units` (default: all) this replica owns (or all do), else zeros.

        Returned by unit position (None for units not asked for). Under
        MirroredStrategy each replica traces its own step with its id a
        constant: only its own inversions enter its graph. Where the id is
        a run-time tensor (TPU, one compiled step for every replica), one
        `tf.switch_case` holds every owner's inversions, one branch per
        replica, instead of a conditional per factor.
        """
        units = list(range(len(self.units))) if units is None else list(units)
        needs_damping = inverse_method(self.inverse_method).needs_factor_damping
        dampings = self._dampings(damping, diagonal_means) if needs_damping else None
        owner_only = set(self.shared_units) | set(self.distributed.unit_owners)
        shared = [u for u in units if u in owner_only]
        payloads: list[list[tf.Tensor] | None] = [None] * len(self.units)
        unshared = [u for u in units if u not in set(shared)]
        for unit, payload in zip(unshared, self._invert(dampings, unshared)):
            payloads[unit] = payload
        if not shared:
            return cast(Payloads, payloads)

        def owner_branch(owner: int) -> Callable[[], Payloads]:
            def branch() -> Payloads:
                own = [u for u in shared if self.plan.owners[u] == owner]
                inverted = dict(zip(own, self._invert(dampings, own)))
                zeros: dict[tuple[int, ...], tf.Tensor] = {}
                for u in shared:
                    for shape in self.payload_shapes[u]:
                        zeros.setdefault(tuple(shape), tf.zeros(shape, curvature_dtype()))
                return [
                    inverted[u]
                    if u in inverted
                    else [zeros[tuple(shape)] for shape in self.payload_shapes[u]]
                    for u in shared
                ]

            return branch

        static_replica = tf.get_static_value(replica)
        if static_replica is not None:
            owned = owner_branch(int(static_replica))()
        else:
            branches = [owner_branch(r) for r in range(self.context.num_replicas)]
            owned = tf.switch_case(replica, branches)
        for unit, payload in zip(shared, owned):
            payloads[unit] = list(payload)
        return cast(Payloads, payloads)

    def _invert(self, dampings: tf.Tensor | None, units: list[int]) -> Payloads:
        """The payloads of `units` (factor indices), counted; reads only their factors."""
        if not units:
            return []
        unit_dampings = None if dampings is None else tf.gather(dampings, self._members_of(units))
        payloads, retries = invert_factors(
            self.factors(units),
            unit_dampings,
            self.inverse_method,
            [self._groups[u] for u in units],
            max_stack_bytes=self.sync_chunk_bytes,
        )
        self.inversions.assign_add(len(units))
        self.inversion_retries.assign_add(tf.cast(tf.add_n(retries), tf.int64))
        return payloads

    @property
    def shared_units(self) -> list[int]:
        """Units computed by one owner and shared (none with one replica, nor distributed)."""
        if self.context.num_replicas == 1:
            return []
        distributed = self.distributed.unit_owners
        return [
            u for u in range(len(self.units)) if self.plan.is_shared(u) and u not in distributed
        ]

    @property
    def sharing(self) -> Sharing:
        """How owners' results reach every replica, chosen per plan (see `inverse_sharing`).

        A sum all-reduce of a buffer holding every shared payload (each replica
        fills only its own) is portable and needs no memory beyond the
        inverses. An all-gather of each replica's own payloads, padded to the
        largest, hands in fewer bytes, but holds N × the largest payload: "auto"
        uses it only when that is no more than the all-reduce buffer. Under
        MultiWorkerMirroredStrategy "auto" has each owner broadcast its
        payloads instead (one packed collective per owner, each replica
        handing in only its own, one owner's buffer at a time).
        """
        multi_worker = isinstance(self.context.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if self.sharing_choice == "broadcast" and not self.context.has_broadcast:
            raise ValueError(
                f"inverse_sharing='broadcast' needs collective broadcasts, which "
                f"{type(self.context).__name__} does not offer; use 'auto'."
            )
        return inverse_sharing(
            self.plan,
            self.inverse_method,
            curvature_dtype().size,
            self.sharing_choice,
            prefer_broadcast=multi_worker and self.context.has_broadcast,
        )

    @property
    def sharing_method(self) -> str | None:
        return self.sharing.method

    def _shared_of(self, units: Sequence[int] | None) -> list[int]:
        """The shared units among `units` (default: every unit), in order."""
        shared = self.shared_units
        if units is None:
            return shared
        wanted = set(units)
        return [u for u in shared if u in wanted]

    def _owned_wire_size(self, replica: int, shared: Sequence[int]) -> int:
        return sum(
            self.units[u].result_floats(self.inverse_method)
            for u in shared
            if self.plan.owners[u] == replica
        )

    def share(self, payloads: Payloads, units: Sequence[int] | None = None) -> Payloads:
        """One collective brings the owners' payloads of `units` (default: all) to every replica."""
        shared = self._shared_of(units)
        if not shared:
            return payloads
        if self.sharing_method == "broadcast":
            return self._broadcast_from_owners(payloads, shared)
        buffer = self.pack_for_sharing(payloads, self.context.replica_id(), shared)
        if self.sharing_method == "all_reduce":
            received = self.context.all_reduce_sum([buffer], INVERSE_SHARE)[0]
        else:
            received = self.context.all_gather(buffer, INVERSE_SHARE)
        return self.unpack_shared(payloads, received, shared)

    def _broadcast_from_owners(self, payloads: Payloads, shared: Sequence[int]) -> Payloads:
        """Each owner broadcasts all its shared payloads in one packed buffer.

        One collective per owner, whatever the number of factors: sharing
        a thousand factors costs the latency of a few collectives, not of a
        thousand, and each replica still hands in only its own payloads.
        """
        payloads = list(payloads)
        replica = self.context.replica_id()
        for owner in range(self.context.num_replicas):
            units = [u for u in shared if self.plan.owners[u] == owner]
            if not units:
                continue
            flat = self._to_wire(payloads, units)
            received = self.context.broadcast(flat, tf.equal(replica, owner), INVERSE_SHARE)
            payloads = self._from_wire(received, units, payloads)
        return payloads

    def pack_for_sharing(
        self, payloads: Payloads, replica: tf.Tensor | int, shared: Sequence[int] | None = None
    ) -> tf.Tensor:
        """This replica's flat sharing buffer of `shared` (default: all shared units).

        Static shape, no collective. All-reduce: every shared payload, zeros
        where another replica owns it. All-gather: this replica's own
        payloads, padded to the largest.
        """
        shared = self._shared_of(shared)
        if self.sharing_method == "all_reduce":
            return self._to_wire(payloads, shared)
        largest = max(self._owned_wire_size(r, shared) for r in range(self.context.num_replicas))

        def packer(replica: int) -> Callable[[], tf.Tensor]:
            own = [u for u in shared if self.plan.owners[u] == replica]
            padding = largest - self._owned_wire_size(replica, shared)
            return lambda: tf.pad(self._to_wire(payloads, own), [[0, padding]])

        static_replica = tf.get_static_value(replica)
        if static_replica is not None:
            return packer(int(static_replica))()
        branches = [packer(r) for r in range(self.context.num_replicas)]
        return tf.switch_case(replica, branches)

    def unpack_shared(
        self, payloads: Payloads, received: tf.Tensor, shared: Sequence[int] | None = None
    ) -> Payloads:
        """Payloads with the units of `shared` (default: all shared) read from the collective."""
        shared = self._shared_of(shared)
        if self.sharing_method == "all_reduce":
            return self._from_wire(received, shared, payloads)
        for r in range(self.context.num_replicas):
            own = [u for u in shared if self.plan.owners[u] == r]
            payloads = self._from_wire(received[r], own, payloads)
        return payloads

    # --- the wire: payloads of equal shapes travel as one stack -------------------
    def _wire_groups(self, units: Sequence[int]) -> list[list[int]]:
        """`units` grouped by payload shapes, the order of the flat sharing buffer."""
        keys = [
            (tuple(tuple(v.shape) for v in self.payloads[u]), self._groups[u] is not None)
            for u in units
        ]
        return [[units[i] for i in group] for group in grouping.groups_of(keys)]

    def _wire_parts(self, group: Sequence[int]) -> list[tuple[tuple[int, ...], bool]]:
        """Each payload tensor's shape in `group`, and whether it travels as a triangle.

        Symmetric inverses travel as triangles (a grouped one, each member's);
        eigenvectors and vectors as they are.
        """
        like = self.payloads[group[0]]
        member_rank = like[0].shape.rank - (self._groups[group[0]] is not None)
        symmetric = len(like) == 1 and member_rank == 2
        return [(tuple(v.shape), symmetric) for v in like]

    def _to_wire(self, payloads: Payloads, units: Sequence[int]) -> tf.Tensor:
        """The payloads of `units` in one flat buffer, a few ops per payload shape."""
        parts = []
        for group in self._wire_groups(units):
            for index, (_, symmetric) in enumerate(self._wire_parts(group)):
                stack = tf.stack([payloads[u][index] for u in group])
                parts.append(tf.reshape(linalg.pack_symmetric(stack) if symmetric else stack, [-1]))
        return _flat(parts)

    def _from_wire(self, flat: tf.Tensor, units: Sequence[int], payloads: Payloads) -> Payloads:
        """`payloads` with `units` read from a flat buffer (its padding ignored)."""
        payloads = list(payloads)
        pieces = []
        for group in self._wire_groups(units):
            for shape, symmetric in self._wire_parts(group):
                wire = (*shape[:-2], linalg.triangle_size(shape[-1])) if symmetric else shape
                pieces.append((group, shape, symmetric, (len(group), *wire)))
        sizes = [int(np.prod(stacked)) for *_, stacked in pieces]
        if not pieces:
            return payloads
        if flat.shape[0] != sum(sizes):
            flat = flat[: sum(sizes)]
        parts = tf.split(flat, sizes) if len(sizes) > 1 else [flat]
        received: dict[int, list[tf.Tensor]] = {}
        for (group, shape, symmetric, stacked), part in zip(pieces, parts):
            stack = tf.reshape(part, stacked)
            if symmetric:
                stack = linalg.unpack_symmetric(stack, shape[-1])
            for u, tensor in zip(group, tf.unstack(stack, num=len(group))):
                received.setdefault(u, []).append(tensor)
        for u, tensors in received.items():
            payloads[u] = tensors
        return payloads

    def install(self, payloads: Payloads, units: Sequence[int] | None = None) -> None:
        """Writes the shared payloads; a non-finite one keeps the previous inverse.

        An inversion with no well-conditioned retry is NaN (see
        `linalg.damped_inverse`); every replica sees the same shared payloads,
        so every replica keeps the same previous inverse and counts it. A
        grouped factor keeps the previous inverse of each failed member only,
        and each counts. Payloads of equal shapes are checked and written as
        one stack.
        """
        failures = []
        units = range(len(self.payloads)) if units is None else units
        for group in self._wire_groups(list(units)):
            new = [
                tf.stack([payloads[u][i] for u in group]) for i in range(len(payloads[group[0]]))
            ]
            # Axes of one member: past the stack axis, and the group axis if any
            # (an empty tensor, identity eigenvectors left out, has no group axis).
            lead = 1 if self._groups[group[0]] is None else 2
            per_tensor = [
                tf.reduce_all(tf.math.is_finite(t), axis=list(range(lead, t.shape.rank)))
                for t in new
                if t.shape.num_elements() or lead == 1
            ]
            ok = tf.reduce_all(per_tensor, axis=0)
            failures.append(tf.reduce_sum(tf.cast(tf.logical_not(ok), tf.int64)))
            for index, value in enumerate(new):
                if lead == 2 and not value.shape.num_elements():
                    continue  # identity eigenvectors left out: nothing to write
                variables = [self.payloads[u][index] for u in group]
                mask = tf.reshape(ok, [*ok.shape] + [1] * (value.shape.rank - ok.shape.rank))
                kept = tf.where(mask, value, grouping.stacks(variables, [range(len(group))])[0])
                _assign(variables, tf.unstack(kept, num=len(group)))
        if failures:
            self.inversion_failures.assign_add(tf.add_n(failures))

    # --- preconditioning ----------------------------------------------------------
    def precondition(
        self, block_grads: Sequence[Sequence[tf.Tensor]], damping: Damping
    ) -> list[list[tf.Tensor]]:
        """F̂⁻¹∇ for each block's gradients (distributed blocks: from their owners)."""
        damping = tf.cast(damping, curvature_dtype())
        distributed = {}
        if self.distributed.active:
            distributed = self.distributed.precondition(
                block_grads, damping, self.context.replica_id()
            )
        out = []
        slices = self.block_factor_slices()
        for b, (block, factor_slice, grads) in enumerate(zip(self.blocks, slices, block_grads)):
            if b in distributed:
                result = distributed[b]
            else:
                payloads = [[v.value for v in p] for p in self.payloads[factor_slice]]
                cast = [tf.cast(g, curvature_dtype()) for g in grads]
                result = block.precondition(cast, payloads, damping, self.inverse_method)
            out.append([tf.cast(r, g.dtype) for r, g in zip(result, grads)])
        return out


def _flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    if not tensors:
        return tf.zeros([0], curvature_dtype())
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _assign(variables: Sequence[Any], values: Sequence[tf.Tensor]) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


def per_replica_variable(optimizer: keras.optimizers.Optimizer) -> AddVariable:
    """An `add_variable` for `Curvature.build`: per-replica state, tracked by Keras.

    `on_read` with `only_first_replica`: each replica writes its own copy with
    no implicit communication, and saving reads replica 0's (identical after
    a sync).
    """

    def add_variable(shape: Sequence[int], name: str, dtype: str | None = None) -> Any:
        dtype = dtype or curvature_dtype().name
        with keras.name_scope(optimizer.name, caller=optimizer):
            variable = keras.Variable(
                initializer="zeros",
                shape=shape,
                dtype=dtype,
                trainable=False,
                aggregation="only_first_replica",
                synchronization="on_read",
                name=name,
            )
        optimizer._track_variable(variable)  # noqa: SLF001
        return variable

    return add_variable


__all__ = ["CHOLESKY", "BatchStatistics", "Curvature", "FACTOR_SYNC_MODES", "per_replica_variable"]
