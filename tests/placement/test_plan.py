"""Tests of inversion units and placement plans: owners, loads and shares."""

import math

import numpy as np
import pytest

from kfac_dist.placement.cost import FlopCostModel
from kfac_dist.placement.plan import PlacementPlan, make_plan, spread_over_slots
from kfac_dist.placement.units import InversionUnit


def dense_units(*shapes):
    """Units of Dense blocks with bias, block by block, A then G."""
    units = []
    for i, (d_in, d_out) in enumerate(shapes):
        units.append(InversionUnit(f"dense_{i}/A", f"dense_{i}", d_in + 1))
        units.append(InversionUnit(f"dense_{i}/G", f"dense_{i}", d_out))
    return units


class FixedOwners:
    name = "fixed"

    def __init__(self, owners):
        self.owners = owners

    def assign(self, costs, num_replicas):
        return list(self.owners)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="", block="b", dim=2), "name"),
        (dict(name=3, block="b", dim=2), "name"),
        (dict(name="b/A", block="", dim=2), r"'b/A'.*block"),
        (dict(name="b/A", block="b", dim=0), r"'b/A'.*dim must be an int >= 1, got 0"),
        (dict(name="b/A", block="b", dim=2.0), r"dim .* got 2.0"),
        (dict(name="b/A", block="b", dim=True), r"dim .* got True"),
        (dict(name="b/A", block="b", dim=2, kind="kron"), r"kind .* got 'kron'"),
    ],
)
def test_inversion_unit_rejects_bad_fields_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        InversionUnit(**kwargs)


def test_inversion_unit_takes_numpy_dims_as_int():
    unit = InversionUnit("d/A", "d", np.int64(5))
    assert type(unit.dim) is int
    assert unit == InversionUnit("d/A", "d", 5)


def test_inversion_unit_result_floats_per_method():
    matrix = InversionUnit("d/A", "d", 4)
    assert matrix.kind == "matrix"
    assert matrix.result_floats("cholesky") == 10  # packed triangle 4*5/2
    assert matrix.result_floats("eigen") == 20  # 16 eigenvector entries + 4 values
    diagonal = InversionUnit("bn/diag", "bn", 4, "diagonal")
    assert diagonal.result_floats("cholesky") == 4
    assert diagonal.result_floats("eigen") == 4
    with pytest.raises(ValueError, match="'svd'"):
        matrix.result_floats("svd")


def test_round_robin_plan_owners_costs_and_loads():
    units = dense_units((3, 2), (4, 5))  # dims 4, 2, 5, 5
    plan = make_plan(units, 2)
    assert plan.policy_name == "round_robin"
    assert plan.owners == (0, 1, 1, 0)
    assert plan.costs == (64.0, 8.0, 125.0, 125.0)
    assert plan.owned_by(0) == [0, 3]
    assert plan.owned_by(1) == [1, 2]
    assert plan.loads == (189.0, 133.0)
    assert plan.load(1) == 133.0
    assert plan.total_cost == 322.0
    assert plan.max_share == pytest.approx(189 / 322)
    assert plan.lower_bound_share == pytest.approx(0.5)
    assert all(plan.is_shared(i) for i in range(4))


def test_lower_bound_share_is_the_largest_unit_when_it_dominates():
    plan = make_plan(dense_units((9, 2)), 4, "balanced")  # dims 10, 2
    assert plan.lower_bound_share == pytest.approx(1000 / 1008)
    assert plan.max_share == pytest.approx(1000 / 1008)


def test_replicated_plan_counts_every_unit_for_every_replica():
    units = dense_units((3, 2), (4, 5))
    plan = make_plan(units, 4, "replicated")
    assert plan.owners == (None,) * 4
    assert plan.loads == (322.0,) * 4
    assert plan.max_share == 1.0
    assert plan.lower_bound_share == pytest.approx(max(1 / 4, 125 / 322))
    assert plan.owned_by(2) == []
    assert plan.replicated() == [0, 1, 2, 3]
    assert not any(plan.is_shared(i) for i in range(4))


def test_mixed_plan_load_adds_replicated_units_to_each_replica():
    units = dense_units((3, 2), (4, 5))
    costs = [64.0, 8.0, 125.0, 125.0]
    owners = [None, 2, 0, 2]
    plan = make_plan(units, 3, FixedOwners(owners))
    for replica in range(3):
        expected = sum(c for c, o in zip(costs, owners, strict=True) if o in (None, replica))
        assert plan.load(replica) == expected
    assert plan.loads == (189.0, 64.0, 197.0)
    assert plan.max_share == pytest.approx(197 / 322)
    assert plan.is_shared(1) and not plan.is_shared(0)
    assert plan.policy_name == "fixed"


def test_balanced_plan_uses_the_cost_model():
    units = dense_units((3, 2), (4, 5))
    eigen = make_plan(units, 2, "balanced", FlopCostModel("eigen"))
    assert eigen.costs == (256.0, 32.0, 500.0, 500.0)
    # LPT: unit 2 -> r0, unit 3 -> r1, unit 0 -> r0, unit 1 -> r1.
    assert eigen.owners == (0, 1, 0, 1)
    by_dim = make_plan(units, 2, "balanced", lambda unit: unit.dim)
    assert by_dim.costs == (4.0, 2.0, 5.0, 5.0)


def test_make_plan_is_deterministic():
    units = dense_units((784, 512), (512, 256), (256, 32), (32, 256))
    for policy in ("round_robin", "balanced", "replicated"):
        first = make_plan(units, 8, policy)
        second = make_plan(list(units), 8, policy)
        assert first == second
        assert hash(first) == hash(second)


def test_plan_of_no_units_has_zero_shares():
    plan = make_plan([], 2)
    assert plan.loads == (0.0, 0.0)
    assert plan.max_share == 0.0
    assert plan.lower_bound_share == 0.0


def test_make_plan_rejects_duplicate_names_and_non_units():
    unit = InversionUnit("d/A", "d", 3)
    with pytest.raises(ValueError, match="Duplicate inversion unit name 'd/A'"):
        make_plan([unit, unit], 2)
    with pytest.raises(ValueError, match="InversionUnit"):
        make_plan([("d/A", 3)], 2)


@pytest.mark.parametrize("bad_cost", [math.nan, -1.0, "1"])
def test_make_plan_rejects_bad_costs_naming_the_unit(bad_cost):
    units = dense_units((3, 2))
    with pytest.raises(ValueError, match=r"for unit 'dense_0/G'"):
        make_plan(units, 2, cost_model=lambda u: bad_cost if u.name.endswith("G") else 1)


def test_make_plan_reports_bad_custom_owners_naming_the_policy():
    with pytest.raises(ValueError, match=r"'fixed'.*owner of unit 1"):
        make_plan(dense_units((3, 2)), 2, FixedOwners([0, 5]))
    with pytest.raises(ValueError, match="Unknown placement policy 'fastest'"):
        make_plan(dense_units((3, 2)), 2, "fastest")


def test_plan_rejects_replica_out_of_range():
    plan = make_plan(dense_units((3, 2)), 2)
    with pytest.raises(ValueError, match=r"replica must be in \[0, 2\), got 2"):
        plan.owned_by(2)
    with pytest.raises(ValueError, match="got -1"):
        plan.load(-1)


def test_plan_built_directly_is_validated_and_immutable():
    units = dense_units((3, 2))
    plan = PlacementPlan(units, [0, None], [64.0, 8.0], 2, "by_hand")
    assert plan.owners == (0, None)
    assert plan.units == tuple(units)
    with pytest.raises(ValueError, match="1 costs for 2 units"):
        PlacementPlan(units, [0, 1], [64.0], 2, "by_hand")
    with pytest.raises(ValueError, match=r"'by_hand'.*owner of unit 1"):
        PlacementPlan(units, [0, 2], [64.0, 8.0], 2, "by_hand")


def test_plan_built_directly_stores_plain_int_owners():
    plan = PlacementPlan(dense_units((3, 2)), np.array([1, 0]), [64.0, 8.0], 2, "np")
    assert plan.owners == (1, 0)
    assert all(type(owner) is int for owner in plan.owners)


def test_a_grouped_unit_sizes_are_its_members_and_groups_is_validated():
    unit = InversionUnit("dw/A", "dw", 4, groups=np.int64(3))
    assert type(unit.groups) is int and unit.groups == 3
    assert InversionUnit("d/A", "d", 4).groups == 1
    assert unit.result_floats("cholesky") == 3 * 10
    assert unit.result_floats("eigen") == 3 * 20
    assert unit.factor_floats() == 3 * 10
    diagonal = InversionUnit("g/A", "g", 4, "diagonal", groups=5)
    assert diagonal.result_floats("eigen") == diagonal.factor_floats() == 20
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"'dw/A'.*groups must be an int >= 1"):
            InversionUnit("dw/A", "dw", 4, groups=bad)


def test_a_grouped_unit_costs_its_groups_times_a_member():
    units = [InversionUnit("dw/A", "dw", 10, groups=8), InversionUnit("d/A", "d", 20)]
    plan = make_plan(units, 2, "balanced")
    assert plan.costs == (8 * 1000.0, 8000.0)


def test_slots_spread_the_work_longest_first_and_depend_on_the_costs_alone():
    costs = [1000.0, 500.0, 400.0, 300.0, 200.0, 100.0, 50.0]
    slots = spread_over_slots(costs, 3)
    loads = [sum(c for c, s in zip(costs, slots) if s == k) for k in range(3)]
    # LPT by hand: 1000→0, 500→1, 400→2, 300→2 (400 < 500), 200→1 (500 < 700),
    # 100→1 (700 = 700: the lower slot), 50→2.
    assert slots == (0, 1, 2, 2, 1, 1, 2)
    assert max(loads) <= sum(costs) / 3 + max(costs)
    units = [InversionUnit(f"b{i}/A", f"b{i}", d) for i, d in enumerate([40, 30, 28, 25, 20, 15])]
    plans = [make_plan(units, n, "balanced", num_slots=4) for n in (1, 2, 4)]
    assert len({plan.slots for plan in plans}) == 1  # the same steps on every replica count
    assert plans[0].slot_costs == plans[2].slot_costs
    assert sum(plans[0].slot_costs) == plans[0].total_cost


def test_each_slot_is_placed_over_the_replicas_on_its_own():
    units = [InversionUnit(f"b{i}/A", f"b{i}", 10) for i in range(8)]
    plan = make_plan(units, 2, "round_robin", num_slots=2)
    for slot in range(2):
        members = plan.in_slot(slot)
        assert len(members) == 4
        # Round robin within the slot: every step's inversions are split evenly.
        assert sorted(plan.owners[i] for i in members) == [0, 0, 1, 1]
    unstaggered = make_plan(units, 2, "round_robin")
    assert unstaggered.slots == (0,) * 8 and unstaggered.num_slots == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(slots=(0, 3), num_slots=2), "slots must lie in"),
        (dict(slots=(0,), num_slots=2), "one slot per unit"),
        (dict(num_slots=0), "num_slots"),
    ],
)
def test_plan_rejects_bad_slots(kwargs, match):
    units = (InversionUnit("a/A", "a", 2), InversionUnit("a/G", "a", 2))
    with pytest.raises(ValueError, match=match):
        PlacementPlan(units, (0, 0), (1.0, 1.0), 1, "round_robin", **kwargs)


def test_spread_over_slots_rejects_a_bad_count():
    with pytest.raises(ValueError, match="num_slots must be an int >= 1"):
        spread_over_slots([1.0], 0)
