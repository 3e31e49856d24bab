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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import keras
import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks import CHOLESKY, KRON, Block
from kfac_dist.linalg import curvature_dtype
from kfac_dist.options import EVERY_UPDATE, FACTOR_SYNC_MODES, LAZY
from kfac_dist.placement import (
    FlopCostModel,
    InversionUnit,
    PlacementPlan,
    Sharing,
    inverse_sharing,
    make_plan,
)
from kfac_dist.strategies import FACTOR_SYNC, INVERSE_SHARE, CrossReplicaContext


def _all_finite(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(t)) for t in tensors])


def inversion_units(blocks: Sequence[Block]) -> list[InversionUnit]:
    """One placement unit per factor, block by block (A then G)."""
    return [
        InversionUnit(
            name=f"{block.name}/{factor_name}",
            block=block.name,
            dim=shape[0],
            kind="diagonal" if len(shape) == 1 else "matrix",
        )
        for block in blocks
        for factor_name, shape in zip(block.factor_names(), block.factor_shapes())
    ]


class BatchStatistics(NamedTuple):
    """One replica's batch statistics between the train step and the fold."""

    statistics: list[tf.Tensor]  # means over the local batch, in factor order
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
        placement,
        cov_ema_decay: float,
        factor_sync: str = LAZY,
        sharing: str = "auto",
    ):
        self.blocks = list(blocks)
        self.context = context
        self.inverse_method = inverse_method
        self.cov_ema_decay = cov_ema_decay
        self.factor_sync = factor_sync
        self.sharing_choice = sharing
        self.units = inversion_units(self.blocks)
        self.plan: PlacementPlan = make_plan(
            self.units,
            context.num_replicas,
            placement,
            cost_model=FlopCostModel(inverse_method),
        )

    # --- state ------------------------------------------------------------
    def build(self, add_variable) -> None:
        """Creates the state with `add_variable(shape, name, dtype)` (per-replica)."""
        self.factor_sums = []
        self.good_sums = []
        for block in self.blocks:
            for name, shape in zip(block.factor_names(), block.factor_shapes()):
                self.factor_sums.append(add_variable(shape, f"{block.name}_{name}_sum"))
                self.good_sums.append(add_variable(shape, f"{block.name}_{name}_good"))
        # Moving sums of [examples, sample weights], as the factors are folded.
        self.weight_sum = add_variable((2,), "weight_sum")
        self.good_weight = add_variable((2,), "weight_good")
        self.payloads = []
        for block in self.blocks:
            for name, shapes in zip(
                block.factor_names(), block.payload_shapes(self.inverse_method)
            ):
                self.payloads.append(
                    [add_variable(s, f"{block.name}_{name}_inv{i}") for i, s in enumerate(shapes)]
                )
        self.skipped_statistics = add_variable((), "skipped_statistics", "int64")
        self.inversions = add_variable((), "inversions_computed", "int64")
        self.inversion_retries = add_variable((), "inversion_retries", "int64")
        # Inverse updates that kept the previous inverse (no well-conditioned retry).
        self.inversion_failures = add_variable((), "inversion_failures", "int64")

    def _block_slices(self):
        start = 0
        for block in self.blocks:
            count = len(block.factor_names())
            yield block, slice(start, start + count)
            start += count

    # --- statistics -----------------------------------------------------------
    def batch_statistics(
        self, statistics: Sequence[tf.Tensor], batch_size: tf.Tensor, weight_total=None
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
        statistics = [
            tf.where(has_examples, tf.cast(s, b.dtype), tf.zeros_like(s, b.dtype))
            for s in statistics
        ]
        return BatchStatistics(list(statistics), weights, _all_finite(statistics))

    def empty_statistics(self) -> BatchStatistics:
        """What a step without statistics hands to `fold` (never folded)."""
        dtype = curvature_dtype()
        zeros = [tf.zeros(v.shape, dtype) for v in self.factor_sums]
        return BatchStatistics(zeros, tf.zeros([2], dtype), tf.constant(True))

    def fold(self, batch: BatchStatistics, apply: tf.Tensor) -> None:
        """S ← εS + (1-ε)·b·F_batch and W ← εW + (1-ε)·[b, Σw] where `apply` holds.

        `apply` must be identical on every replica (the caller decides it on
        all-reduced values), so a non-finite batch on one replica leaves every
        replica's sums as they were.
        """
        decay = tf.constant(self.cov_ema_decay, curvature_dtype())
        b = batch.weights[0]

        def fold():
            for var, stat in zip(self.factor_sums, batch.statistics):
                var.assign(decay * var + ((1.0 - decay) * b) * stat)
            self.weight_sum.assign(decay * self.weight_sum + (1.0 - decay) * batch.weights)
            return tf.no_op()

        tf.cond(apply, fold, tf.no_op)
        if self.factor_sync == EVERY_UPDATE:
            self.sync()

    def sync(self) -> tf.Tensor:
        """One packed all-reduce of the local sums; returns whether they were finite.

        Symmetric factors travel as triangles. Non-finite synced sums are seen
        identically by every replica, which all fall back to the last good
        sums without another collective.
        """
        if self.context.num_replicas == 1:
            # Nothing to exchange: only keep (or fall back to) the last good sums.
            finite = _all_finite([self.weight_sum, *self.factor_sums])
            sums = [v.value for v in self.factor_sums] + [self.weight_sum.value]
        else:
            packed = [
                linalg.pack_symmetric(v) if v.shape.rank == 2 else tf.convert_to_tensor(v)
                for v in self.factor_sums
            ] + [tf.convert_to_tensor(self.weight_sum)]
            summed = self.context.all_reduce_sum(packed, FACTOR_SYNC)
            finite = _all_finite(summed)
            share = 1.0 / self.context.num_replicas
            sums = [
                (linalg.unpack_symmetric(v, var.shape[0]) if var.shape.rank == 2 else v) * share
                for v, var in zip(summed[:-1], self.factor_sums)
            ] + [summed[-1] * share]
        current = [*self.factor_sums, self.weight_sum]
        good = [*self.good_sums, self.good_weight]

        def keep():
            for var, copy, value in zip(current, good, sums):
                var.assign(value)
                copy.assign(value)
            return tf.no_op()

        def restore():
            for var, copy in zip(current, good):
                var.assign(copy)
            return tf.no_op()

        tf.cond(finite, keep, restore)
        self.skipped_statistics.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        return finite

    def factors(self) -> list[tf.Tensor]:
        """The synced factors S/W (valid right after a sync).

        Kronecker input factors are also divided by the mean sample weight:
        with the weights on G through the pseudo-loss, A ⊗ G is then the
        weighted GGN (exact for a linear layer under weighted MSE).
        """
        examples, weights = tf.unstack(self.weight_sum.value)
        examples = tf.maximum(examples, 1e-30)
        mean_weight = tf.where(weights > 0, weights / examples, tf.ones_like(weights))
        out = []
        for block, factor_slice in self._block_slices():
            for index, var in enumerate(self.factor_sums[factor_slice]):
                factor = var.value / examples
                if block.approx == KRON and index == 0:
                    factor = factor / mean_weight
                out.append(factor)
        return out

    # --- inverses ---------------------------------------------------------------
    def update_inverses(self, damping) -> None:
        """Syncs (unless synced on every update), then inverts and shares."""
        finite = tf.constant(True) if self.factor_sync == EVERY_UPDATE else self.sync()
        tf.cond(finite, lambda: self._invert_and_share(damping), tf.no_op)

    def _invert_and_share(self, damping):
        payloads = self.owned_payloads(self.factors(), damping, self.context.replica_id())
        self.install(self.share(payloads))
        return tf.no_op()

    def owned_payloads(self, factors, damping, replica) -> list[list[tf.Tensor]]:
        """Each unit's payload if this replica owns it (or all do), else zeros.

        One `tf.switch_case` on `replica`, a run-time tensor (as on TPU), holds
        every owner's inversions: one compiled step serves every replica, and
        the graph has one branch per replica instead of a conditional per
        factor, which kept the first trace superlinear in the factor count.
        """
        jobs = [
            (block, index, factors[factor_slice])
            for block, factor_slice in self._block_slices()
            for index in range(factor_slice.stop - factor_slice.start)
        ]
        shared = self.shared_units
        payloads: list[list[tf.Tensor] | None] = [None] * len(jobs)
        for unit in sorted(set(range(len(jobs))) - set(shared)):
            payloads[unit] = self._invert([jobs[unit]], damping)[0]
        if not shared:
            return payloads

        def owner_branch(owner: int):
            def branch():
                own = [u for u in shared if self.plan.owners[u] == owner]
                inverted = dict(zip(own, self._invert([jobs[u] for u in own], damping)))
                return [
                    inverted[u]
                    if u in inverted
                    else [tf.zeros(v.shape, curvature_dtype()) for v in self.payloads[u]]
                    for u in shared
                ]

            return branch

        branches = [owner_branch(r) for r in range(self.context.num_replicas)]
        for unit, payload in zip(shared, tf.switch_case(replica, branches)):
            payloads[unit] = list(payload)
        return payloads

    def _invert(self, jobs, damping) -> list[list[tf.Tensor]]:
        """The payloads of `jobs` (block, factor index, block factors), counted."""
        results, retries = [], []
        for block, index, block_factors in jobs:
            payload, tries = block.invert(index, block_factors, damping, self.inverse_method)
            results.append(payload)
            retries.append(tf.cast(tries, tf.int64))
        if jobs:
            self.inversions.assign_add(len(jobs))
            self.inversion_retries.assign_add(tf.add_n(retries))
        return results

    @property
    def shared_units(self) -> list[int]:
        """Units computed by one owner and shared (none with one replica)."""
        if self.context.num_replicas == 1:
            return []
        return [u for u in range(len(self.units)) if self.plan.is_shared(u)]

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

    def _owned_wire_size(self, replica: int) -> int:
        return sum(
            self.units[u].result_floats(self.inverse_method)
            for u in self.shared_units
            if self.plan.owners[u] == replica
        )

    def share(self, payloads: list[list[tf.Tensor]]) -> list[list[tf.Tensor]]:
        """One collective brings every owner's payloads to every replica."""
        if not self.shared_units:
            return payloads
        if self.sharing_method == "broadcast":
            return self._broadcast_from_owners(payloads)
        buffer = self.pack_for_sharing(payloads, self.context.replica_id())
        if self.sharing_method == "all_reduce":
            received = self.context.all_reduce_sum([buffer], INVERSE_SHARE)[0]
        else:
            received = self.context.all_gather(buffer, INVERSE_SHARE)
        return self.unpack_shared(payloads, received)

    def _broadcast_from_owners(self, payloads):
        """Each owner broadcasts all its shared payloads in one packed buffer.

        One collective per owner, whatever the number of factors: sharing
        a thousand factors costs the latency of a few collectives, not of a
        thousand, and each replica still hands in only its own payloads.
        """
        payloads = list(payloads)
        replica = self.context.replica_id()
        for owner in range(self.context.num_replicas):
            units = [u for u in self.shared_units if self.plan.owners[u] == owner]
            if not units:
                continue
            wires = [_to_wire(payloads[u]) for u in units]
            flat = _flat([t for wire in wires for t in wire])
            received = self.context.broadcast(flat, tf.equal(replica, owner), INVERSE_SHARE)
            offset = 0
            for u, wire in zip(units, wires):
                parts = []
                for t in wire:
                    n = t.shape.num_elements()
                    parts.append(tf.reshape(received[offset : offset + n], t.shape))
                    offset += n
                payloads[u] = _from_wire(iter(parts), payloads[u])
        return payloads

    def pack_for_sharing(self, payloads: list[list[tf.Tensor]], replica) -> tf.Tensor:
        """This replica's flat sharing buffer (static shape; no collective).

        All-reduce: every shared payload, zeros where another replica owns it.
        All-gather: this replica's own payloads, padded to the largest.
        """
        shared = self.shared_units
        if self.sharing_method == "all_reduce":
            return _flat([t for u in shared for t in _to_wire(payloads[u])])
        largest = max(self._owned_wire_size(r) for r in range(self.context.num_replicas))

        def packer(replica: int):
            own = [u for u in shared if self.plan.owners[u] == replica]
            padding = largest - self._owned_wire_size(replica)
            return lambda: tf.pad(
                _flat([t for u in own for t in _to_wire(payloads[u])]), [[0, padding]]
            )

        branches = [packer(r) for r in range(self.context.num_replicas)]
        return tf.switch_case(replica, branches)

    def unpack_shared(self, payloads, received: tf.Tensor) -> list[list[tf.Tensor]]:
        """Payloads with every shared unit taken from the collective's result."""
        payloads = list(payloads)
        shared = self.shared_units
        if self.sharing_method == "all_reduce":
            segments = [(received, shared)]
        else:
            segments = [
                (received[r], [u for u in shared if self.plan.owners[u] == r])
                for r in range(self.context.num_replicas)
            ]
        for flat, units in segments:
            offset = 0
            for u in units:
                parts = []
                for t in _to_wire(payloads[u]):
                    n = t.shape.num_elements()
                    parts.append(tf.reshape(flat[offset : offset + n], t.shape))
                    offset += n
                payloads[u] = _from_wire(iter(parts), payloads[u])
        return payloads

    def install(self, payloads: list[list[tf.Tensor]]) -> None:
        """Writes the shared payloads; a non-finite one keeps the previous inverse.

        An inversion with no well-conditioned retry is NaN (see
        `linalg.damped_inverse`); every replica sees the same shared payloads,
        so every replica keeps the same previous inverse and counts it.
        """
        failures = tf.constant(0, tf.int64)
        for variables, payload in zip(self.payloads, payloads):
            ok = _all_finite(payload)
            failures += tf.cast(tf.logical_not(ok), tf.int64)
            for var, value in zip(variables, payload):
                var.assign(tf.where(ok, value, var))
        self.inversion_failures.assign_add(failures)

    # --- preconditioning ----------------------------------------------------------
    def precondition(
        self, block_grads: Sequence[Sequence[tf.Tensor]], damping
    ) -> list[list[tf.Tensor]]:
        """F̂⁻¹∇ for each block's gradients."""
        out = []
        for (block, factor_slice), grads in zip(self._block_slices(), block_grads):
            payloads = [[v.value for v in p] for p in self.payloads[factor_slice]]
            cast = [tf.cast(g, curvature_dtype()) for g in grads]
            damping = tf.cast(damping, curvature_dtype())
            result = block.precondition(cast, payloads, damping, self.inverse_method)
            out.append([tf.cast(r, g.dtype) for r, g in zip(result, grads)])
        return out


def _flat(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    if not tensors:
        return tf.zeros([0], curvature_dtype())
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _to_wire(payload: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Symmetric inverses travel as triangles; eigenvectors and vectors as they are."""
    if len(payload) == 1 and payload[0].shape.rank == 2:
        return [linalg.pack_symmetric(payload[0])]
    return list(payload)


def _from_wire(received, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    if len(like) == 1 and like[0].shape.rank == 2:
        return [linalg.unpack_symmetric(next(received), like[0].shape[0])]
    return [next(received) for _ in like]


def per_replica_variable(optimizer: keras.optimizers.Optimizer):
    """An `add_variable` for `Curvature.build`: per-replica state, tracked by Keras.

    `on_read` with `only_first_replica`: each replica writes its own copy with
    no implicit communication, and saving reads replica 0's (identical after
    a sync).
    """

    def add_variable(shape, name: str, dtype: str | None = None):
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
