"""Distributed preconditioning: blocks whose inverses only their owner holds (as in KAISA).

With `Kfac(inverse_replication=f)`, f < 1, some blocks are distributed:
their owner replica inverts both of their factors, keeps the results in a
buffer of its own, and preconditions their gradients every step; one
all-reduce of the preconditioned gradients (zeros where another replica owns
the block) brings them to every replica, exactly (x + 0 = x). The other
blocks stay replicated: their inverses are shared as before. Which blocks
are distributed is `placement.communication.distribute_blocks`: most inverse
memory per gradient float first, until every replica holds at most
f·total + (1−f)·total/N of the inverses. f = 1 (the default) distributes
nothing — every replica holds every inverse, no per-step collective beyond
the gradients' (KAISA's grad_worker_fraction = 1, "COMM-OPT"); f = 0
distributes every block, each replica holding only its own (fraction 1/N,
"MEM-OPT"), for one more all-reduce of the distributed gradients per step.
The collectives here span every replica, so what f trades is memory against
that per-step all-reduce, not the size of the groups KAISA broadcasts within.

Replicas hold different inverses, but a variable has one shape on every
replica: each replica's distributed inverses lie in one flat buffer, sized
for the replica that holds the most, at offsets of its own. A checkpoint
saves one replica's variables, so the buffer is not saved: a restored job
recomputes the inverses at its first step (`needs_inverses`), from the
restored factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import tensorflow as tf

from kfac_dist.linalg import curvature_dtype
from kfac_dist.placement.communication import ModelShape, distribute_blocks
from kfac_dist.strategies import PRECONDITIONED

if TYPE_CHECKING:
    from kfac_dist.curvature import Curvature, Payloads


@dataclasses.dataclass(frozen=True)
class HeldPayload:
    """Where one payload tensor of a distributed unit lies in its owner's buffer."""

    unit: int
    index: int
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class DistributedBlocks:
    """The distributed blocks of a curvature: owners, buffers, their per-step preconditioning."""

    def __init__(self, curvature: Curvature, replication: float):
        self.curvature = curvature
        self.replication = replication
        num_replicas = curvature.context.num_replicas
        blocks = curvature.blocks
        shape = ModelShape(
            "model",
            tuple(curvature.units),
            {block.name: max(1, block.num_params) for block in blocks},
        )
        distribution = distribute_blocks(shape, num_replicas, curvature.inverse_method, replication)
        #: Each distributed block's index and its owner.
        self.owners: dict[int, int] = {
            b: distribution.owners[block.name]
            for b, block in enumerate(blocks)
            if block.name in distribution.owners
        }
        #: Each distributed unit's owner (both factors of a block: the block's).
        self.unit_owners: dict[int, int] = {}
        for b, factors in enumerate(curvature.block_factor_slices()):
            if b in self.owners:
                for unit in range(factors.start, factors.stop):
                    self.unit_owners[unit] = self.owners[b]
        self.layouts: list[list[HeldPayload]] = []
        for replica in range(num_replicas):
            layout, offset = [], 0
            for unit in sorted(u for u, r in self.unit_owners.items() if r == replica):
                for index, payload_shape in enumerate(curvature.payload_shapes[unit]):
                    layout.append(HeldPayload(unit, index, offset, tuple(payload_shape)))
                    offset += layout[-1].size
            self.layouts.append(layout)
        #: Each replica's payloads by unit, in payload order.
        self.places: list[dict[int, list[HeldPayload]]] = []
        for layout in self.layouts:
            places: dict[int, list[HeldPayload]] = {}
            for place in layout:
                places.setdefault(place.unit, []).append(place)
            self.places.append(places)
        #: Floats of the buffer: those of the replica that holds the most.
        self.size = max((sum(p.size for p in layout) for layout in self.layouts), default=0)

    @property
    def active(self) -> bool:
        return bool(self.owners)

    def held_floats(self, replica: int) -> int:
        """The floats of distributed inverses `replica` holds."""
        return sum(p.size for p in self.layouts[replica])

    def build(self) -> None:
        """The buffer and flags: per replica, and not saved (see the module docstring)."""
        dtype = curvature_dtype()
        self.held = _local_variable(tf.zeros([self.size], dtype), "held_inverses")
        # 0 until this process has inverted: a fresh or restored job inverts first.
        self.ready = _local_variable(tf.constant(False), "held_inverses_ready")
        # This replica's failed inversions since the last step (summed every step).
        self.pending_failures = _local_variable(tf.constant(0.0, dtype), "held_failures")

    def needs_inverses(self) -> tf.Tensor:
        """Whether the held inverses must be computed now (the same on every replica)."""
        return tf.logical_not(self.ready)

    # --- inverse update ---------------------------------------------------------
    def hold(self, payloads: Payloads, units: Sequence[int], replica: tf.Tensor | int) -> None:
        """Writes this replica's own distributed payloads among `units` into its buffer.

        A non-finite payload (an inversion with no well-conditioned retry)
        keeps the previous one, and counts as a failure.
        """
        wanted = set(units)

        def writer(owner: int) -> Callable[[], tf.Tensor]:
            def write() -> tf.Tensor:
                pieces, failures = [], tf.constant(0.0, curvature_dtype())
                for unit, places in self.places[owner].items():
                    start, end = places[0].offset, places[-1].offset + places[-1].size
                    old = self.held[start:end]
                    if unit not in wanted:
                        pieces.append(old)
                        continue
                    new = tf.concat([tf.reshape(payloads[unit][p.index], [-1]) for p in places], 0)
                    finite = tf.reduce_all(tf.math.is_finite(new))
                    pieces.append(tf.where(finite, new, old))
                    failures += tf.cast(tf.logical_not(finite), failures.dtype)
                pieces.append(tf.zeros([self.size - self.held_floats(owner)], curvature_dtype()))
                self.held.assign(tf.concat(pieces, axis=0))
                self.pending_failures.assign_add(failures)
                return tf.constant(0)

            return write

        _per_replica(replica, self.curvature.context.num_replicas, writer)
        self.ready.assign(True)

    # --- every step --------------------------------------------------------------
    def precondition(
        self,
        block_grads: Sequence[Sequence[tf.Tensor]],
        damping: tf.Tensor,
        replica: tf.Tensor | int,
    ) -> dict[int, list[tf.Tensor]]:
        """F̂⁻¹∇ of every distributed block, on every replica: owners compute, one all-reduce."""
        curvature = self.curvature
        slices = curvature.block_factor_slices()
        blocks = sorted(self.owners)
        like = [[tf.cast(g, curvature_dtype()) for g in block_grads[b]] for b in blocks]

        def owner_buffer(owner: int) -> Callable[[], tf.Tensor]:
            def compute() -> tf.Tensor:
                parts = []
                for b, grads in zip(blocks, like):
                    if self.owners[b] != owner:
                        parts += [tf.zeros_like(g) for g in grads]
                        continue
                    payloads = [
                        [
                            tf.reshape(self.held[p.offset : p.offset + p.size], p.shape)
                            for p in self.places[owner][unit]
                        ]
                        for unit in range(slices[b].start, slices[b].stop)
                    ]
                    block = curvature.blocks[b]
                    parts += block.precondition(grads, payloads, damping, curvature.inverse_method)
                return tf.concat([tf.reshape(p, [-1]) for p in parts], axis=0)

            return compute

        buffer = _per_replica(replica, curvature.context.num_replicas, owner_buffer)
        buffer = tf.concat([buffer, tf.reshape(self.pending_failures.read_value(), [1])], axis=0)
        summed = curvature.context.all_reduce_sum([buffer], PRECONDITIONED)[0]
        curvature.inversion_failures.assign_add(tf.cast(summed[-1], tf.int64))
        self.pending_failures.assign(tf.zeros_like(self.pending_failures))
        out: dict[int, list[tf.Tensor]] = {}
        offset = 0
        for b, grads in zip(blocks, like):
            out[b] = []
            for g in grads:
                size = g.shape.num_elements()
                out[b].append(tf.reshape(summed[offset : offset + size], g.shape))
                offset += size
        return out


def _per_replica(
    replica: tf.Tensor | int, num_replicas: int, branch: Callable[[int], Callable[[], Any]]
) -> Any:
    """`branch(replica)()`: traced for that replica alone when its id is static, else a switch."""
    static = tf.get_static_value(replica)
    if static is not None:
        return branch(int(static))()
    return tf.switch_case(replica, [branch(r) for r in range(num_replicas)])


def _local_variable(initial: tf.Tensor, name: str) -> tf.Variable:
    """A per-replica variable no collective reads and no checkpoint saves."""
    return tf.Variable(
        initial,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )
