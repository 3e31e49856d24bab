"""Placement policies: which replica owns (inverts and shares) each unit."""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Sequence
from typing import Protocol, cast

from kfac_dist.options import BuiltinPlacement


class PlacementPolicy(Protocol):
    """Assigns an owner replica to each unit from the units' costs.

    `assign` returns one entry per unit: the owner's replica id in
    `[0, num_replicas)`, or `None` for a unit that every replica computes
    itself and that is not shared. Built-in policies also carry a `name`.
    """

    def assign(self, costs: Sequence[float], num_replicas: int) -> list[int | None]: ...


def policy_name(policy: PlacementPolicy) -> str:
    """The policy's `name`, or its class name for custom policies without one."""
    return getattr(policy, "name", type(policy).__name__)


def check_request(costs: Sequence[float], num_replicas: int, name: str) -> None:
    """Raises ValueError unless `num_replicas >= 1` and every cost is finite, >= 0."""
    if (
        isinstance(num_replicas, bool)
        or not isinstance(num_replicas, numbers.Integral)
        or num_replicas < 1
    ):
        raise ValueError(
            f"Placement policy {name!r}: num_replicas must be an int >= 1, got {num_replicas!r}."
        )
    for i, cost in enumerate(costs):
        if not isinstance(cost, numbers.Real) or not math.isfinite(cost) or cost < 0:
            raise ValueError(
                f"Placement policy {name!r}: cost of unit {i} must be a finite "
                f"number >= 0, got {cost!r}."
            )


def check_owners(
    owners: Sequence[int | None], num_units: int, num_replicas: int, name: str
) -> tuple[int | None, ...]:
    """Validates a policy's answer and returns it as a tuple of int or None."""
    try:
        length = len(owners)
    except TypeError:
        raise ValueError(
            f"Placement policy {name!r} must return a sequence of owners, "
            f"got {type(owners).__name__}."
        ) from None
    if length != num_units:
        raise ValueError(
            f"Placement policy {name!r} returned {length} owners for {num_units} units."
        )
    checked: list[int | None] = []
    for i, owner in enumerate(owners):
        if owner is None:
            checked.append(None)
        elif (
            isinstance(owner, bool)
            or not isinstance(owner, numbers.Integral)
            or not 0 <= owner < num_replicas
        ):
            raise ValueError(
                f"Placement policy {name!r}: owner of unit {i} must be None or an "
                f"int in [0, {num_replicas}), got {owner!r}."
            )
        else:
            checked.append(int(owner))
    return tuple(checked)


def assign_owners(
    policy: PlacementPolicy, costs: Sequence[float], num_replicas: int
) -> tuple[int | None, ...]:
    """Runs `policy` on validated inputs and validates its answer."""
    name = policy_name(policy)
    check_request(costs, num_replicas, name)
    owners = policy.assign(list(costs), num_replicas)
    return check_owners(owners, len(costs), num_replicas, name)


class RoundRobin:
    """Owner of the k-th unit is `(k + k // N) % N`; costs are ignored.

    Each window of N consecutive units covers every replica once, and the
    window's offset rotates by one. With units listed block by block (A then
    G), the naive `k % N` would, for even N, put every A factor on an even
    replica and every G factor on an odd one; the rotation spreads both.
    """

    name = BuiltinPlacement.ROUND_ROBIN.value

    def assign(self, costs: Sequence[float], num_replicas: int) -> list[int | None]:
        check_request(costs, num_replicas, self.name)
        n = num_replicas
        return [(k + k // n) % n for k in range(len(costs))]


class Balanced:
    """Greedy longest-processing-time placement by cost.

    Units in descending cost (ties by index) each go to the least-loaded
    replica so far (ties to the lowest replica id). The largest load is at
    most `4/3 - 1/(3N)` times the optimum (Graham, 1969).
    """

    name = BuiltinPlacement.BALANCED.value

    def assign(self, costs: Sequence[float], num_replicas: int) -> list[int | None]:
        check_request(costs, num_replicas, self.name)
        owners: list[int | None] = [None] * len(costs)
        # (load, replica): the heap's tuple order breaks load ties by replica id.
        loads = [(0.0, replica) for replica in range(num_replicas)]
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            load, replica = heapq.heappop(loads)
            owners[i] = replica
            heapq.heappush(loads, (load + costs[i], replica))
        return owners


class Replicated:
    """Every replica computes every unit: no sharing, no communication."""

    name = BuiltinPlacement.REPLICATED.value

    def assign(self, costs: Sequence[float], num_replicas: int) -> list[int | None]:
        check_request(costs, num_replicas, self.name)
        return [None] * len(costs)


BUILTIN_POLICIES = {cls.name: cls for cls in (RoundRobin, Balanced, Replicated)}


def resolve_policy(policy: str | PlacementPolicy) -> PlacementPolicy:
    """A built-in policy by name, or `policy` itself if it has `assign`."""
    if isinstance(policy, str) and policy in BUILTIN_POLICIES:
        return BUILTIN_POLICIES[policy]()
    # A class has an `assign` attribute too, but calling it unbound fails later.
    is_instance = not isinstance(policy, (str, type))
    if is_instance and callable(getattr(policy, "assign", None)):
        return cast(PlacementPolicy, policy)
    hint = ""
    if isinstance(policy, type):
        hint = f" (got the class {policy.__name__}; pass an instance)"
    raise ValueError(
        f"Unknown placement policy {policy!r}{hint}: expected one of "
        f"{', '.join(repr(name) for name in BUILTIN_POLICIES)}, or an object with "
        "a method assign(costs, num_replicas) -> list[int | None]."
    )
