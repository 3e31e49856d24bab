"""The placement plan: each inversion unit's owner replica, its cost, the loads."""

from __future__ import annotations

import dataclasses
import heapq
import math
import numbers
from collections.abc import Sequence

from kfac_dist.placement.cost import CostModel, FlopCostModel
from kfac_dist.placement.policies import (
    PlacementPolicy,
    assign_owners,
    check_owners,
    check_request,
    policy_name,
    resolve_policy,
)
from kfac_dist.placement.units import InversionUnit


@dataclasses.dataclass(frozen=True)
class PlacementPlan:
    """Which replica inverts each unit (`None`: every replica, not shared), and at which step.

    Build it with `make_plan`. A unit with owner `None` counts in every
    replica's load. Shares are fractions of `total_cost`, the cost of
    inverting every unit once; with a total of 0 every share is 0.

    Staggered inverse updates (`num_slots` k > 1) spread the inversions of
    one inverse period over its k steps: unit i is inverted at the steps
    whose index is `slots[i]` modulo k (and all at the first step).
    """

    units: tuple[InversionUnit, ...]
    owners: tuple[int | None, ...]
    costs: tuple[float, ...]
    num_replicas: int
    policy_name: str
    slots: tuple[int, ...] = ()
    num_slots: int = 1

    def __post_init__(self) -> None:
        # Tuples keep a plan immutable and hashable even if built from lists.
        if not self.slots:
            object.__setattr__(self, "slots", (0,) * len(self.units))
        for field in ("units", "owners", "costs", "slots"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        if len(self.costs) != len(self.units):
            raise ValueError(
                f"PlacementPlan has {len(self.costs)} costs for {len(self.units)} units."
            )
        if isinstance(self.num_slots, bool) or not isinstance(self.num_slots, int):
            raise ValueError(
                f"PlacementPlan num_slots must be an int >= 1, got {self.num_slots!r}."
            )
        if self.num_slots < 1 or len(self.slots) != len(self.units):
            raise ValueError(
                f"PlacementPlan has {len(self.slots)} slots for {len(self.units)} units "
                f"and num_slots={self.num_slots}; expected one slot per unit and num_slots >= 1."
            )
        if any(not 0 <= slot < self.num_slots for slot in self.slots):
            raise ValueError(
                f"PlacementPlan slots must lie in [0, {self.num_slots}), got {self.slots}."
            )
        check_request(self.costs, self.num_replicas, self.policy_name)
        owners = check_owners(self.owners, len(self.units), self.num_replicas, self.policy_name)
        object.__setattr__(self, "owners", owners)

    def is_shared(self, i: int) -> bool:
        """Whether unit `i` is computed by one owner and shared with the others."""
        return self.owners[i] is not None

    def owned_by(self, replica: int) -> list[int]:
        """Indices of the units `replica` computes and shares."""
        self._check_replica(replica)
        return [i for i, owner in enumerate(self.owners) if owner == replica]

    def in_slot(self, slot: int) -> list[int]:
        """Indices of the units inverted at the steps of `slot` (every unit with one slot)."""
        return [i for i, s in enumerate(self.slots) if s == slot]

    @property
    def slot_costs(self) -> tuple[float, ...]:
        """The inversion cost of each slot, over all replicas."""
        return tuple(
            math.fsum(c for c, s in zip(self.costs, self.slots) if s == slot)
            for slot in range(self.num_slots)
        )

    def replicated(self) -> list[int]:
        """Indices of the units every replica computes for itself."""
        return [i for i, owner in enumerate(self.owners) if owner is None]

    def load(self, replica: int) -> float:
        """Cost of the units `replica` computes: its own and the replicated ones."""
        self._check_replica(replica)
        return math.fsum(
            cost
            for cost, owner in zip(self.costs, self.owners, strict=True)
            if owner is None or owner == replica
        )

    @property
    def loads(self) -> tuple[float, ...]:
        return tuple(self.load(replica) for replica in range(self.num_replicas))

    @property
    def total_cost(self) -> float:
        """Cost of inverting every unit once."""
        return math.fsum(self.costs)

    @property
    def max_share(self) -> float:
        """Largest replica load over the total cost: the inverse update's span."""
        total = self.total_cost
        return max(self.loads) / total if total > 0 else 0.0

    @property
    def lower_bound_share(self) -> float:
        """The smallest `max_share` any placement of these costs could reach.

        No replica can do less than an even split, `1/N`, nor less than the
        largest single unit. It ignores the plan's owners, so a replicated
        plan (max share 1) shows how much sharing could save.
        """
        total = self.total_cost
        if total == 0:
            return 0.0
        return max(1.0 / self.num_replicas, max(self.costs) / total)

    def _check_replica(self, replica: int) -> None:
        if not 0 <= replica < self.num_replicas:
            raise ValueError(f"replica must be in [0, {self.num_replicas}), got {replica!r}.")


def make_plan(
    units: Sequence[InversionUnit],
    num_replicas: int,
    policy: str | PlacementPolicy = "round_robin",
    cost_model: CostModel | None = None,
    num_slots: int = 1,
) -> PlacementPlan:
    """Prices every unit with `cost_model`, spreads the units over `num_slots` steps, places them.

    The slots depend on the costs alone (longest first, each to the
    cheapest slot so far), never on the replica count, so every replica
    count inverts the same units at the same steps; `policy` then places
    each slot's units over the replicas, so that every step's inversions
    are balanced.

    Args:
        units: the inversion units, block by block (A then G for Kronecker
            blocks); unit names must be unique.
        num_replicas: number of replicas in sync, at least 1.
        policy: `"round_robin"`, `"balanced"`, `"replicated"`, or an object
            with `assign(costs, num_replicas)`.
        cost_model: maps a unit to its cost; defaults to
            `FlopCostModel("cholesky")`.
        num_slots: the steps of one inverse period the inversions are
            spread over (1: all at once).
    """
    units = tuple(units)
    seen: set[str] = set()
    for unit in units:
        if not isinstance(unit, InversionUnit):
            raise ValueError(f"make_plan expects InversionUnit items, got {unit!r}.")
        if unit.name in seen:
            raise ValueError(f"Duplicate inversion unit name {unit.name!r}.")
        seen.add(unit.name)
    policy = resolve_policy(policy)
    cost_model = cost_model if cost_model is not None else FlopCostModel("cholesky")
    costs = tuple(_priced(cost_model, unit) for unit in units)
    slots = spread_over_slots(costs, num_slots)
    owners: list[int | None] = [None] * len(units)
    for slot in range(num_slots):
        members = [i for i, s in enumerate(slots) if s == slot]
        slot_owners = assign_owners(policy, [costs[i] for i in members], num_replicas)
        for i, owner in zip(members, slot_owners):
            owners[i] = owner
    return PlacementPlan(
        units=units,
        owners=tuple(owners),
        costs=costs,
        num_replicas=num_replicas,
        policy_name=policy_name(policy),
        slots=slots,
        num_slots=num_slots,
    )


def spread_over_slots(costs: Sequence[float], num_slots: int) -> tuple[int, ...]:
    """Each unit's slot: longest first, each to the slot with the least cost so far.

    Longest-processing-time scheduling: no slot exceeds the even split by
    more than the largest unit. Ties go to the lower slot and the lower
    index, so the answer depends on the costs alone.
    """
    if isinstance(num_slots, bool) or not isinstance(num_slots, numbers.Integral) or num_slots < 1:
        raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}.")
    loads = [(0.0, slot) for slot in range(num_slots)]
    slots = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, slot = heapq.heappop(loads)
        slots[i] = slot
        heapq.heappush(loads, (load + costs[i], slot))
    return tuple(slots)


def _priced(cost_model: CostModel, unit: InversionUnit) -> float:
    cost = cost_model(unit)
    if not isinstance(cost, numbers.Real) or not math.isfinite(cost) or cost < 0:
        raise ValueError(
            f"Cost model {cost_model!r} gave {cost!r} for unit {unit.name!r}: "
            "costs must be finite numbers >= 0."
        )
    return float(cost)
