"""Tests of the placement table and its JSON form."""

import json

import pytest

from kfac_dist.placement.plan import make_plan
from kfac_dist.placement.report import (
    factor_sync_bytes,
    format_bytes,
    format_placement_table,
    inverse_sharing,
    plan_to_dict,
)
from kfac_dist.placement.units import InversionUnit

UNITS = [
    InversionUnit("dense/A", "dense", 4),
    InversionUnit("dense/G", "dense", 2),
    InversionUnit("dense_1/A", "dense_1", 5),
    InversionUnit("dense_1/G", "dense_1", 5),
    InversionUnit("bn/diag", "bn", 8, "diagonal"),
]
COSTS = [64.0, 8.0, 125.0, 125.0, 8.0]
TOTAL = sum(COSTS)


def replica_rows(table, num_replicas):
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["replica", "units", "cost", "share"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    return [line.split() for line in lines[2 : 2 + num_replicas]]


def test_table_has_one_row_per_replica_with_owned_units_and_shares():
    plan = make_plan(UNITS, 2)  # round robin: owners 0, 1, 1, 0, 0
    table = format_placement_table(plan)
    rows = replica_rows(table, 2)
    load_0 = COSTS[0] + COSTS[3] + COSTS[4]
    load_1 = COSTS[1] + COSTS[2]
    assert rows[0][:4] == ["0", "3", f"{load_0:.3g}", f"{100 * load_0 / TOTAL:.1f}%"]
    assert " ".join(rows[0][4:]) == "dense/A, dense_1/G, bn/diag"
    assert rows[1][:4] == ["1", "2", f"{load_1:.3g}", f"{100 * load_1 / TOTAL:.1f}%"]
    assert " ".join(rows[1][4:]) == "dense/G, dense_1/A"
    footer = "\n".join(table.splitlines()[4:])
    assert "policy round_robin" in footer
    assert f"max share {100 * load_0 / TOTAL:.1f}%" in footer
    assert "lower bound 50.0%" in footer
    assert "state" not in table and "sync" not in table


def test_table_columns_are_aligned():
    plan = make_plan(UNITS, 4, "balanced")
    lines = format_placement_table(plan, state_bytes_per_replica=[1, 2, 3, 4]).splitlines()
    # The share column ends at the same place on every row.
    ends = {line.index("%") for line in lines[2:6]}
    assert len(ends) == 1
    assert lines[0].index("share") + len("share") == ends.pop() + 1


def test_table_shows_bytes_when_given():
    plan = make_plan(UNITS, 2, "balanced")
    table = format_placement_table(
        plan,
        bytes_per_factor_sync=3 * 1024 * 1024,
        bytes_per_inverse_share=1536,
        state_bytes_per_replica=[2048, 512],
    )
    assert table.splitlines()[0].split()[4] == "state"
    rows = replica_rows(table, 2)
    assert rows[0][4:6] == ["2.0", "KiB"]
    assert rows[1][4:6] == ["512", "B"]
    assert "factor sync 3.0 MiB" in table
    assert "inverse sharing 1.5 KiB" in table


def test_table_lists_replicated_units_in_the_footer():
    table = format_placement_table(make_plan(UNITS, 3, "replicated"))
    rows = replica_rows(table, 3)
    assert [row[:4] for row in rows] == [[str(r), "0", "330", "100.0%"] for r in range(3)]
    assert "5 computed by every replica (dense/A, dense/G" in table
    assert "max share 100.0% (lower bound 37.9%)" in table


def test_table_cuts_long_name_lists():
    units = [InversionUnit(f"block_{i:02d}/A", f"block_{i:02d}", 3) for i in range(20)]
    table = format_placement_table(make_plan(units, 1), names_width=40)
    row = table.splitlines()[2]
    names = row[row.index("block_00") :]
    assert len(names) <= 40
    assert names == "block_00/A, block_01/A, ... +18 more"


def test_plan_to_dict_carries_the_plan_and_survives_json():
    plan = make_plan(UNITS, 2, "balanced")
    info = json.loads(
        json.dumps(
            plan_to_dict(
                plan,
                bytes_per_factor_sync=100,
                bytes_per_inverse_share=50,
                state_bytes_per_replica=[7, 8],
            )
        )
    )
    assert info["policy"] == "balanced"
    assert info["num_replicas"] == 2
    assert info["total_cost"] == TOTAL
    assert info["max_share"] == pytest.approx(plan.max_share)
    assert info["lower_bound_share"] == pytest.approx(plan.lower_bound_share)
    assert [u["name"] for u in info["units"]] == [u.name for u in UNITS]
    assert [u["cost"] for u in info["units"]] == COSTS
    assert [u["owner"] for u in info["units"]] == list(plan.owners)
    assert info["units"][4]["kind"] == "diagonal"
    for replica in info["replicas"]:
        r = replica["replica"]
        assert replica["units"] == [UNITS[i].name for i in plan.owned_by(r)]
        assert replica["cost"] == plan.load(r)
        assert replica["share"] == pytest.approx(plan.load(r) / TOTAL)
        assert replica["state_bytes"] == [7, 8][r]
    assert info["replicated_units"] == []
    assert info["bytes_per_factor_sync"] == 100
    assert info["bytes_per_inverse_share"] == 50


def test_plan_to_dict_marks_replicated_units_and_missing_bytes():
    info = plan_to_dict(make_plan(UNITS, 2, "replicated"))
    assert [u["owner"] for u in info["units"]] == [None] * 5
    assert info["replicated_units"] == [u.name for u in UNITS]
    assert info["bytes_per_factor_sync"] is None
    assert all(replica["state_bytes"] is None for replica in info["replicas"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(state_bytes_per_replica=[1]), "1 entries for 2 replicas"),
        (dict(state_bytes_per_replica=[1, -1]), "state_bytes_per_replica"),
        (dict(bytes_per_factor_sync=-5), "bytes_per_factor_sync .* got -5"),
        (dict(bytes_per_inverse_share=1.5), "bytes_per_inverse_share .* got 1.5"),
    ],
)
def test_reports_reject_bad_byte_counts(kwargs, match):
    plan = make_plan(UNITS, 2)
    with pytest.raises(ValueError, match=match):
        format_placement_table(plan, **kwargs)
    with pytest.raises(ValueError, match=match):
        plan_to_dict(plan, **kwargs)


def test_format_bytes_uses_binary_units():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1024) == "1.0 KiB"
    assert format_bytes(3 * 1024**2 // 2) == "1.5 MiB"
    assert format_bytes(5 * 1024**4) == "5.0 TiB"
    assert format_bytes(2048 * 1024**4) == "2048.0 TiB"


@pytest.mark.parametrize("num_replicas", [2, 3, 8])
def test_broadcast_sharing_is_one_collective_per_owner_whatever_the_factor_count(num_replicas):
    units = [InversionUnit(f"d{i}/A", f"d{i}", 3 + i % 4) for i in range(40)]
    plan = make_plan(units, num_replicas, "round_robin")
    sharing = inverse_sharing(plan, "cholesky", 4, "auto", prefer_broadcast=True)
    own = [0] * num_replicas
    for unit, owner in zip(units, plan.owners):
        own[owner] += unit.dim * (unit.dim + 1) // 2
    assert sharing.method == "broadcast"
    assert sharing.collectives == num_replicas < len(units)
    assert sharing.sent == sharing.buffer == 4 * max(own)
    table = format_placement_table(
        plan,
        bytes_per_inverse_share=sharing.sent,
        sharing_method="broadcast",
        sharing_collectives=sharing.collectives,
    )
    assert f"(broadcast, {num_replicas} collectives)" in table


def test_a_grouped_unit_is_one_row_entry_with_its_members_bytes():
    units = [
        InversionUnit("dw/A", "dw", 10, groups=960),
        InversionUnit("dw/G", "dw", 1, groups=960),
        InversionUnit("dense/A", "dense", 4),
    ]
    plan = make_plan(units, 2)
    info = plan_to_dict(plan, bytes_per_factor_sync=factor_sync_bytes(units))
    assert [(u["name"], u["dim"], u["groups"]) for u in info["units"]] == [
        ("dw/A", 10, 960),
        ("dw/G", 1, 960),
        ("dense/A", 4, 1),
    ]
    # Each member's triangle, the ungrouped factor's, and the two weight sums.
    assert factor_sync_bytes(units) == (960 * 55 + 960 * 1 + 10 + 2) * 4
    sharing = inverse_sharing(plan, "eigen", 8, "all_reduce")
    assert sharing.sent == (960 * (100 + 10) + 960 * 2 + (16 + 4)) * 8
