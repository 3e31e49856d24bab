"""Tests of the placement policies against hand-computed and brute-force answers."""

import itertools

import numpy as np
import pytest

from kfac_dist.placement.policies import (
    Balanced,
    Replicated,
    RoundRobin,
    assign_owners,
    resolve_policy,
)


def max_load(costs, owners, num_replicas):
    loads = [0.0] * num_replicas
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += cost
    return max(loads)


def optimal_max_load(costs, num_replicas):
    return min(
        max_load(costs, owners, num_replicas)
        for owners in itertools.product(range(num_replicas), repeat=len(costs))
    )


def test_round_robin_matches_hand_computed_owners():
    assert RoundRobin().assign([1.0] * 8, 2) == [0, 1, 1, 0, 0, 1, 1, 0]
    assert RoundRobin().assign([1.0] * 9, 3) == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert RoundRobin().assign([1.0] * 3, 1) == [0, 0, 0]
    assert RoundRobin().assign([], 4) == []


@pytest.mark.parametrize("num_replicas", [2, 4, 8])
def test_round_robin_windows_cover_every_replica_once(num_replicas):
    owners = RoundRobin().assign([1.0] * (3 * num_replicas * num_replicas), num_replicas)
    for start in range(0, len(owners), num_replicas):
        window = owners[start : start + num_replicas]
        assert sorted(window) == list(range(num_replicas))


@pytest.mark.parametrize("num_replicas", [2, 4, 8])
def test_round_robin_spreads_a_and_g_factors_over_all_replicas(num_replicas):
    # Units listed block by block, A then G: A factors at even k, G at odd k.
    num_units = num_replicas * num_replicas
    owners = RoundRobin().assign([1.0] * num_units, num_replicas)
    for parity in (0, 1):
        counts = np.bincount(owners[parity::2], minlength=num_replicas)
        assert counts.tolist() == [num_replicas // 2] * num_replicas
    # The naive k % N is what the rotation fixes: all A factors on even replicas.
    naive = [k % num_replicas for k in range(num_units)]
    assert {owner % 2 for owner in naive[0::2]} == {0}


def test_balanced_matches_hand_computed_owners():
    # LPT: 3->r0, 3->r1, 2->r0, 2->r1, 2->r0.
    assert Balanced().assign([3, 3, 2, 2, 2], 2) == [0, 1, 0, 1, 0]
    # Sorted by cost descending: unit 1 first, then units 0 and 2 by index.
    assert Balanced().assign([1.0, 5.0, 1.0], 3) == [1, 0, 2]
    # Equal costs and equal loads: ties go to the lowest index and replica id.
    assert Balanced().assign([1.0] * 5, 2) == [0, 1, 0, 1, 0]
    assert Balanced().assign([2.0, 7.0], 4) == [1, 0]


def test_balanced_reaches_the_lpt_bound_on_its_tight_instance():
    costs, num_replicas = [3, 3, 2, 2, 2], 2
    greedy = max_load(costs, Balanced().assign(costs, num_replicas), num_replicas)
    assert greedy == 7
    assert optimal_max_load(costs, num_replicas) == 6
    assert greedy / 6 == pytest.approx(4 / 3 - 1 / (3 * num_replicas))


def test_balanced_is_within_lpt_bound_of_brute_force_optimum():
    rng = np.random.default_rng(1234)
    for _ in range(300):
        num_replicas = int(rng.integers(1, 4))
        num_units = int(rng.integers(1, 8))
        if rng.random() < 0.5:
            costs = rng.integers(1, 10, num_units).astype(float).tolist()
        else:
            costs = rng.exponential(1.0, num_units).tolist()
        owners = Balanced().assign(costs, num_replicas)
        assert len(owners) == num_units
        assert all(0 <= owner < num_replicas for owner in owners)
        greedy = max_load(costs, owners, num_replicas)
        optimum = optimal_max_load(costs, num_replicas)
        assert optimum <= greedy + 1e-12
        assert greedy <= (4 / 3 - 1 / (3 * num_replicas)) * optimum + 1e-12


def test_balanced_beats_round_robin_on_one_dominant_factor():
    costs = [1000.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    balanced = max_load(costs, Balanced().assign(costs, 2), 2)
    round_robin = max_load(costs, RoundRobin().assign(costs, 2), 2)
    assert balanced == 1000.0
    assert round_robin == 1002.0


def test_replicated_leaves_every_unit_to_every_replica():
    assert Replicated().assign([1.0, 2.0, 3.0], 4) == [None, None, None]


@pytest.mark.parametrize("policy", [RoundRobin(), Balanced(), Replicated()])
def test_policies_are_deterministic(policy):
    costs = np.random.default_rng(0).exponential(1.0, 50).tolist()
    assert policy.assign(costs, 8) == policy.assign(list(costs), 8)
    assert policy.assign(costs, 8) == policy.assign(tuple(costs), 8)


@pytest.mark.parametrize("policy", [RoundRobin(), Balanced(), Replicated()])
@pytest.mark.parametrize("num_replicas", [0, -1, 1.5, True, "2"])
def test_policies_reject_bad_num_replicas(policy, num_replicas):
    with pytest.raises(ValueError, match="num_replicas") as info:
        policy.assign([1.0], num_replicas)
    assert policy.name in str(info.value)


@pytest.mark.parametrize("bad_cost", [float("nan"), float("inf"), -1.0, "3"])
def test_policies_reject_bad_costs_naming_the_unit(bad_cost):
    with pytest.raises(ValueError, match=r"'balanced'.*unit 1"):
        Balanced().assign([1.0, bad_cost], 2)


def test_resolve_policy_knows_the_built_in_names():
    assert isinstance(resolve_policy("round_robin"), RoundRobin)
    assert isinstance(resolve_policy("balanced"), Balanced)
    assert isinstance(resolve_policy("replicated"), Replicated)


def test_resolve_policy_returns_objects_with_assign_unchanged():
    class EverythingOnZero:
        def assign(self, costs, num_replicas):
            return [0] * len(costs)

    policy = EverythingOnZero()
    assert resolve_policy(policy) is policy
    balanced = Balanced()
    assert resolve_policy(balanced) is balanced


@pytest.mark.parametrize("bad", ["roundrobin", "", 3, None, object()])
def test_resolve_policy_rejects_unknown_policies_listing_the_valid_ones(bad):
    with pytest.raises(ValueError) as info:
        resolve_policy(bad)
    message = str(info.value)
    for name in ("'round_robin'", "'balanced'", "'replicated'"):
        assert name in message
    assert "assign(costs, num_replicas)" in message


def test_resolve_policy_rejects_a_class_asking_for_an_instance():
    with pytest.raises(ValueError, match="pass an instance"):
        resolve_policy(Balanced)


class NamedPolicy:
    name = "my_policy"

    def __init__(self, owners):
        self.owners = owners

    def assign(self, costs, num_replicas):
        return self.owners


@pytest.mark.parametrize(
    "owners, match",
    [
        ([0, 1], "returned 2 owners for 3 units"),
        ([0, 1, 2], r"owner of unit 2 must be None or an int in \[0, 2\), got 2"),
        ([0, -1, 1], r"owner of unit 1 .* got -1"),
        ([0, 1.0, 1], r"owner of unit 1 .* got 1.0"),
        ([0, True, 1], r"owner of unit 1 .* got True"),
        (None, "must return a sequence of owners"),
    ],
)
def test_assign_owners_rejects_bad_custom_answers_naming_the_policy(owners, match):
    with pytest.raises(ValueError, match=match) as info:
        assign_owners(NamedPolicy(owners), [1.0, 1.0, 1.0], 2)
    assert "'my_policy'" in str(info.value)


def test_assign_owners_names_unnamed_custom_policies_by_class():
    class Lopsided:
        def assign(self, costs, num_replicas):
            return [num_replicas] * len(costs)

    with pytest.raises(ValueError, match="'Lopsided'"):
        assign_owners(Lopsided(), [1.0], 2)


def test_assign_owners_accepts_numpy_owners_and_none():
    owners = assign_owners(NamedPolicy(np.array([1, 0, 1])), [1.0, 1.0, 1.0], 2)
    assert owners == (1, 0, 1)
    assert all(type(owner) is int for owner in owners)
    assert assign_owners(NamedPolicy([None, 1, None]), [1.0] * 3, 2) == (None, 1, None)


def test_assign_owners_validates_inputs_before_calling_a_custom_policy():
    with pytest.raises(ValueError, match=r"'my_policy'.*num_replicas"):
        assign_owners(NamedPolicy([0]), [1.0], 0)
