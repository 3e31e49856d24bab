"""Placement reports: bytes moved and held per replica, a per-replica table, a dict for JSON."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kfac_dist.options import SHARING_METHODS
from kfac_dist.placement.plan import PlacementPlan
from kfac_dist.placement.units import InversionUnit, check_method

if TYPE_CHECKING:  # the curvature needs TensorFlow; its report does not
    from kfac_dist.curvature import Curvature


def format_bytes(num_bytes: int) -> str:
    """`num_bytes` in binary units: `"512 B"`, `"1.5 KiB"`, `"3.0 MiB"`."""
    if num_bytes < 1024:
        return f"{num_bytes} B"
    value = num_bytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# The factor sync carries, after the factors, the moving sums of the examples
# seen and of their sample weights.
SYNC_WEIGHT_FLOATS = 2


def factor_sync_bytes(
    units: Sequence[InversionUnit], itemsize: int = 4, weight_floats: int = SYNC_WEIGHT_FLOATS
) -> int:
    """Bytes every replica hands in to one factor sync.

    The sync all-reduces one packed buffer: each matrix factor's triangle
    `n(n+1)/2`, each diagonal factor's `n` entries (each member's, for a
    grouped factor), and `weight_floats`.
    """
    floats = sum(u.factor_floats() for u in units)
    return (floats + weight_floats) * itemsize


@dataclasses.dataclass(frozen=True)
class Sharing:
    """How owners' results reach every replica on an inverse update, in bytes per replica.

    `method` is `"all_reduce"`, `"all_gather"`, `"broadcast"`, or `None` when
    nothing is shared; `sent` is what each replica hands in to the collective
    (for broadcasts: the most any replica sends, its own payloads) and
    `buffer` the transient buffer it holds for it. `collectives` is how many
    collectives one sharing phase issues: one all-reduce or all-gather, one
    broadcast per owner (never one per factor), none when nothing is shared.
    """

    method: str | None
    sent: int
    buffer: int
    collectives: int | None = None  # default: 1, or 0 when nothing is shared

    def __post_init__(self) -> None:
        if self.collectives is None:
            object.__setattr__(self, "collectives", 0 if self.method is None else 1)


def inverse_sharing(
    plan: PlacementPlan,
    method: str,
    itemsize: int = 4,
    sharing: str = "auto",
    prefer_broadcast: bool = False,
) -> Sharing:
    """The sharing collective `Kfac(inverse_sharing=sharing)` issues for `plan`.

    A sum all-reduce hands in every shared payload (each replica fills only
    its own): sent and buffer are their total. An all-gather hands in each
    replica's own payloads padded to the largest replica's, and holds N of
    them. `"auto"` takes the all-gather when its buffer is no larger than the
    all-reduce's — unless `prefer_broadcast` (multi-worker collectives, where
    bandwidth between hosts is what counts): then each owner broadcasts all
    its payloads packed in one buffer, one collective per owner whatever the
    number of factors, handing in only its own and holding one owner's
    buffer at a time. Units every replica computes are not shared, and one
    replica shares nothing.
    """
    check_method(method)
    if sharing not in SHARING_METHODS:
        raise ValueError(f"sharing must be one of {SHARING_METHODS}, got {sharing!r}.")
    own = [0] * plan.num_replicas
    for unit, owner in zip(plan.units, plan.owners, strict=True):
        if owner is not None:
            own[owner] += unit.result_floats(method)
    total, largest = sum(own), max(own)
    if plan.num_replicas == 1 or total == 0:
        return Sharing(None, 0, 0)
    if sharing == "auto" and prefer_broadcast:
        sharing = "broadcast"
    elif sharing == "auto":
        sharing = "all_gather" if plan.num_replicas * largest <= total else "all_reduce"
    if sharing == "broadcast":
        owners = sum(1 for floats in own if floats > 0)
        return Sharing(sharing, largest * itemsize, largest * itemsize, owners)
    if sharing == "all_gather":
        return Sharing(sharing, largest * itemsize, plan.num_replicas * largest * itemsize)
    return Sharing(sharing, total * itemsize, total * itemsize)


@dataclasses.dataclass(frozen=True)
class ReplicaMemory:
    """K-FAC memory on one replica, in bytes: persistent state apart from buffers.

    The state persists between steps: the factor sums (one copy, with the
    sums of examples and weights) and the inverse payloads. The buffers
    live only during one collective: the largest chunk of packed factor
    sums handed to the factor sync and the packed payloads handed to the
    inverse sharing.
    """

    factor_sums: int
    inverses: int
    sync_buffer: int
    share_buffer: int

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _check_bytes(f"ReplicaMemory.{field.name}", getattr(self, field.name))

    @property
    def state(self) -> int:
        return self.factor_sums + self.inverses

    @property
    def buffers(self) -> int:
        return self.sync_buffer + self.share_buffer

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "state": self.state, "buffers": self.buffers}


def format_placement_table(
    plan: PlacementPlan,
    *,
    bytes_per_factor_sync: int | None = None,
    bytes_per_inverse_share: int | None = None,
    sharing_method: str | None = None,
    sharing_collectives: int | None = None,
    state_bytes_per_replica: Sequence[int] | None = None,
    memory_per_replica: Sequence[ReplicaMemory] | None = None,
    names_width: int = 60,
) -> str:
    """A fixed-width table, one row per replica, and a footer on the plan.

    Rows: replica id, number of units it owns, its load (cost of what it
    computes, replicated units included), that load as a share of the total,
    its K-FAC state in bytes when `state_bytes_per_replica` or
    `memory_per_replica` is given (the latter adds its transient buffers),
    and the names of its units, cut to `names_width` characters. The footer
    names the policy, the replicated units, the max share against its lower
    bound, the bytes each replica hands in per factor sync
    (`bytes_per_factor_sync`) and per inverse sharing
    (`bytes_per_inverse_share`, through `sharing_method` in
    `sharing_collectives` collectives), when given, and the memory breakdown
    when every replica holds the same.
    """
    info = plan_to_dict(
        plan,
        bytes_per_factor_sync=bytes_per_factor_sync,
        bytes_per_inverse_share=bytes_per_inverse_share,
        sharing_method=sharing_method,
        sharing_collectives=sharing_collectives,
        state_bytes_per_replica=state_bytes_per_replica,
        memory_per_replica=memory_per_replica,
    )
    show_state = state_bytes_per_replica is not None or memory_per_replica is not None
    header = ["replica", "units", "cost", "share"]
    if show_state:
        header.append("state")
    if memory_per_replica is not None:
        header.append("buffers")
    header.append("owned units")
    rows = []
    for replica in info["replicas"]:
        row = [
            str(replica["replica"]),
            str(len(replica["units"])),
            f"{replica['cost']:.3g}",
            f"{100 * replica['share']:.1f}%",
        ]
        if show_state:
            row.append(format_bytes(replica["state_bytes"]))
        if memory_per_replica is not None:
            row.append(format_bytes(replica["memory"]["buffers"]))
        row.append(_abbreviate(replica["units"], names_width))
        rows.append(row)
    widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        # Numbers right-aligned; the names, last, left-aligned and unpadded.
        aligned = [cell.rjust(width) for cell, width in zip(cells, widths, strict=True)]
        return "  ".join([*aligned[:-1], cells[-1]]).rstrip()

    lines = [line(header), line(["-" * width for width in widths])]
    lines += [line(row) for row in rows]
    replicated = info["replicated_units"]
    summary = f"policy {info['policy']}: {len(info['units'])} units on {plan.num_replicas} replicas"
    if replicated:
        summary += (
            f", {len(replicated)} computed by every replica "
            f"({_abbreviate(replicated, names_width)})"
        )
    lines.append(summary)
    lines.append(
        f"max share {100 * info['max_share']:.1f}% "
        f"(lower bound {100 * info['lower_bound_share']:.1f}%)"
    )
    if plan.num_slots > 1:
        lines.append(
            f"staggered: the units spread over {plan.num_slots} steps of each inverse period "
            "(all at the first step); "
            "step of the period: units inverted, share of the work"
        )
        for slot in info["slots"]:
            lines.append(
                f"  step {slot['slot']}: {len(slot['units'])} units, "
                f"{100 * slot['share']:.1f}% ({_abbreviate(slot['units'], names_width)})"
            )
    traffic = []
    if bytes_per_factor_sync is not None:
        traffic.append(f"factor sync {format_bytes(bytes_per_factor_sync)} per sync")
    if bytes_per_inverse_share is not None:
        how = [sharing_method] if sharing_method else []
        if sharing_method and sharing_collectives is not None:
            how.append(f"{sharing_collectives} collective{'s' * (sharing_collectives != 1)}")
        via = f" ({', '.join(how)})" if how else ""
        traffic.append(
            f"inverse sharing {format_bytes(bytes_per_inverse_share)} per inverse update{via}"
        )
    if traffic:
        lines.append("handed in by each replica: " + ", ".join(traffic))
    if memory_per_replica is not None and len(set(memory_per_replica)) == 1:
        lines.append(_memory_line(memory_per_replica[0]))
    return "\n".join(lines)


def plan_to_dict(
    plan: PlacementPlan,
    *,
    bytes_per_factor_sync: int | None = None,
    bytes_per_inverse_share: int | None = None,
    sharing_method: str | None = None,
    sharing_collectives: int | None = None,
    state_bytes_per_replica: Sequence[int] | None = None,
    memory_per_replica: Sequence[ReplicaMemory] | None = None,
) -> dict:
    """The plan and its costs as JSON-ready data (`None` becomes `null`).

    The bytes arguments mean what they mean in `format_placement_table`;
    those not given are `None`. With `memory_per_replica`, each replica's
    `state_bytes` is its persistent state and `memory` its breakdown.
    """
    for name, value in (
        ("bytes_per_factor_sync", bytes_per_factor_sync),
        ("bytes_per_inverse_share", bytes_per_inverse_share),
        ("sharing_collectives", sharing_collectives),
    ):
        if value is not None:
            _check_bytes(name, value)
    if state_bytes_per_replica is not None and memory_per_replica is not None:
        raise ValueError(
            "Give state_bytes_per_replica or memory_per_replica, not both: "
            "a ReplicaMemory carries its state."
        )
    memory = None
    if memory_per_replica is not None:
        memory = _per_replica(plan, "memory_per_replica", memory_per_replica)
        for value in memory:
            if not isinstance(value, ReplicaMemory):
                raise ValueError(f"memory_per_replica expects ReplicaMemory items, got {value!r}.")
        state_bytes_per_replica = [value.state for value in memory]
    elif state_bytes_per_replica is not None:
        state_bytes_per_replica = _per_replica(
            plan, "state_bytes_per_replica", state_bytes_per_replica
        )
        for value in state_bytes_per_replica:
            _check_bytes("state_bytes_per_replica", value)
    total = plan.total_cost
    replicas = []
    for replica, load in enumerate(plan.loads):
        replicas.append(
            {
                "replica": replica,
                "units": [plan.units[i].name for i in plan.owned_by(replica)],
                "cost": load,
                "share": load / total if total > 0 else 0.0,
                "state_bytes": (
                    None
                    if state_bytes_per_replica is None
                    else int(state_bytes_per_replica[replica])
                ),
                "memory": None if memory is None else memory[replica].as_dict(),
            }
        )
    return {
        "policy": plan.policy_name,
        "num_replicas": plan.num_replicas,
        "total_cost": total,
        "max_share": plan.max_share,
        "lower_bound_share": plan.lower_bound_share,
        "units": [
            {
                "name": unit.name,
                "block": unit.block,
                "dim": unit.dim,
                "kind": unit.kind,
                "groups": unit.groups,
                "cost": cost,
                "owner": owner,
                "slot": slot,
            }
            for unit, cost, owner, slot in zip(
                plan.units, plan.costs, plan.owners, plan.slots, strict=True
            )
        ],
        "num_slots": plan.num_slots,
        "slots": [
            {
                "slot": slot,
                "units": [plan.units[i].name for i in plan.in_slot(slot)],
                "cost": cost,
                "share": cost / total if total > 0 else 0.0,
            }
            for slot, cost in enumerate(plan.slot_costs)
        ],
        "replicas": replicas,
        "replicated_units": [plan.units[i].name for i in plan.replicated()],
        "bytes_per_factor_sync": bytes_per_factor_sync,
        "bytes_per_inverse_share": bytes_per_inverse_share,
        "sharing_method": sharing_method,
        "sharing_collectives": sharing_collectives,
    }


def _per_replica(plan: PlacementPlan, name: str, values: Sequence) -> list:
    values = list(values)
    if len(values) != plan.num_replicas:
        raise ValueError(f"{name} has {len(values)} entries for {plan.num_replicas} replicas.")
    return values


def _memory_line(memory: ReplicaMemory) -> str:
    return (
        f"memory per replica: state {format_bytes(memory.state)} "
        f"(factor sums {format_bytes(memory.factor_sums)}, "
        f"inverses {format_bytes(memory.inverses)}); "
        f"buffers {format_bytes(memory.buffers)} "
        f"(factor sync {format_bytes(memory.sync_buffer)}, "
        f"inverse sharing {format_bytes(memory.share_buffer)})"
    )


def _check_bytes(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}.")


def _abbreviate(names: Sequence[str], width: int) -> str:
    """Comma-joined names; past `width` characters, the tail as `... +k more`."""
    text = ", ".join(names)
    if len(text) <= width:
        return text
    for shown in range(len(names) - 1, -1, -1):
        text = ", ".join([*names[:shown], f"... +{len(names) - shown} more"])
        if len(text) <= width:
            return text
    return text


def curvature_report(curvature: Curvature, as_dict: bool = False) -> str | dict[str, Any]:
    """The placement report of a built `Curvature` (what `Kfac.placement_report` returns).

    One row per replica: the factors it inverts and shares, their cost
    under the plan's cost model and its share of the total, and its K-FAC
    memory — the persistent state (factor sums, inverse payloads) apart
    from the transient buffers of the factor sync (its largest chunk) and
    of the inverse sharing. The footer gives the bytes each replica hands
    in to those two collectives.
    """
    plan = curvature.plan
    dtype = np.dtype(curvature.weight_sum.dtype)
    sync_bytes = factor_sync_bytes(
        curvature.units, dtype.itemsize, weight_floats=int(np.prod(curvature.weight_sum.shape))
    )
    sharing = curvature.sharing
    # Every replica holds every factor and every (shared) inverse.
    memory = ReplicaMemory(
        factor_sums=_variable_bytes([*curvature.factor_sums, curvature.weight_sum]),
        # Distributed inverses: each replica's own, in a buffer sized for the largest.
        inverses=_variable_bytes([v for p in curvature.payloads for v in p])
        + curvature.distributed.size * dtype.itemsize,
        sync_buffer=curvature.largest_sync_chunk_bytes if plan.num_replicas > 1 else 0,
        share_buffer=sharing.buffer,
    )
    reported: dict[str, Any] = dict(
        bytes_per_factor_sync=sync_bytes,
        bytes_per_inverse_share=sharing.sent,
        sharing_method=curvature.sharing_method,
        sharing_collectives=sharing.collectives,
        memory_per_replica=[memory] * plan.num_replicas,
    )
    distributed = curvature.distributed
    preconditioned = (
        (sum(curvature.blocks[b].num_params for b in distributed.owners) + 1) * dtype.itemsize
        if distributed.active
        else 0
    )
    if not as_dict:
        table = format_placement_table(plan, **reported)
        if not distributed.active:
            return table
        names = ", ".join(curvature.blocks[b].name for b in sorted(distributed.owners))
        return (
            f"{table}\ndistributed preconditioning (inverse_replication="
            f"{distributed.replication:g}): {len(distributed.owners)} blocks held by their "
            f"owner only ({names}); preconditioned gradients "
            f"{format_bytes(preconditioned)} per step"
        )
    return {
        **plan_to_dict(plan, **reported),
        "distributed_blocks": {
            curvature.blocks[b].name: owner for b, owner in sorted(distributed.owners.items())
        },
        "bytes_per_step_preconditioned": preconditioned,
        "inverse_method": curvature.inverse_method,
        "factor_sync": curvature.factor_sync,
        "dtype": dtype.name,
    }


def _variable_bytes(variables: Sequence[Any]) -> int:
    return sum(
        int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in variables
    )
