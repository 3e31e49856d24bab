"""Placement reports: a per-replica table for logs and a dict for JSON."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from kfac_dist.placement.plan import PlacementPlan


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


def format_placement_table(
    plan: PlacementPlan,
    *,
    bytes_per_factor_sync: int | None = None,
    bytes_per_inverse_share: int | None = None,
    state_bytes_per_replica: Sequence[int] | None = None,
    names_width: int = 60,
) -> str:
    """A fixed-width table, one row per replica, and a footer on the plan.

    Rows: replica id, number of units it owns, its load (cost of what it
    computes, replicated units included), that load as a share of the total,
    its K-FAC state in bytes when `state_bytes_per_replica` is given, and the
    names of its units, cut to `names_width` characters. The footer names the
    policy, the replicated units, the max share against its lower bound, and
    the bytes each replica moves per inverse update in the factor all-reduce
    (`bytes_per_factor_sync`) and in sharing the inverses
    (`bytes_per_inverse_share`), when given.
    """
    info = plan_to_dict(
        plan,
        bytes_per_factor_sync=bytes_per_factor_sync,
        bytes_per_inverse_share=bytes_per_inverse_share,
        state_bytes_per_replica=state_bytes_per_replica,
    )
    header = ["replica", "units", "cost", "share"]
    if state_bytes_per_replica is not None:
        header.append("state")
    header.append("owned units")
    rows = []
    for replica in info["replicas"]:
        row = [
            str(replica["replica"]),
            str(len(replica["units"])),
            f"{replica['cost']:.3g}",
            f"{100 * replica['share']:.1f}%",
        ]
        if state_bytes_per_replica is not None:
            row.append(format_bytes(replica["state_bytes"]))
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
    traffic = []
    if bytes_per_factor_sync is not None:
        traffic.append(f"factor sync {format_bytes(bytes_per_factor_sync)}")
    if bytes_per_inverse_share is not None:
        traffic.append(f"inverse sharing {format_bytes(bytes_per_inverse_share)}")
    if traffic:
        lines.append("per replica per inverse update: " + ", ".join(traffic))
    return "\n".join(lines)


def plan_to_dict(
    plan: PlacementPlan,
    *,
    bytes_per_factor_sync: int | None = None,
    bytes_per_inverse_share: int | None = None,
    state_bytes_per_replica: Sequence[int] | None = None,
) -> dict:
    """The plan and its costs as JSON-ready data (`None` becomes `null`).

    The bytes arguments mean what they mean in `format_placement_table`;
    those not given are `None`.
    """
    for name, value in (
        ("bytes_per_factor_sync", bytes_per_factor_sync),
        ("bytes_per_inverse_share", bytes_per_inverse_share),
    ):
        if value is not None:
            _check_bytes(name, value)
    if state_bytes_per_replica is not None:
        state_bytes_per_replica = list(state_bytes_per_replica)
        if len(state_bytes_per_replica) != plan.num_replicas:
            raise ValueError(
                f"state_bytes_per_replica has {len(state_bytes_per_replica)} "
                f"entries for {plan.num_replicas} replicas."
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
                "cost": cost,
                "owner": owner,
            }
            for unit, cost, owner in zip(plan.units, plan.costs, plan.owners, strict=True)
        ],
        "replicas": replicas,
        "replicated_units": [plan.units[i].name for i in plan.replicated()],
        "bytes_per_factor_sync": bytes_per_factor_sync,
        "bytes_per_inverse_share": bytes_per_inverse_share,
    }


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
