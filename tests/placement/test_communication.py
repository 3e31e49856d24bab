"""Tests of the communication and memory model: α–β times, bytes per mode, distributed blocks."""

import math
import subprocess
import sys

import pytest

from kfac_dist.placement import InversionUnit, PlacementPlan, inverse_sharing, make_plan
from kfac_dist.placement.communication import (
    ETHERNET_100G,
    ModelShape,
    Network,
    bert_shape,
    communication_cost,
    distribute_blocks,
    replica_owners,
    stagger_slots,
    stored_factor_floats,
    stored_inverse_floats,
    update_traffic,
)
from tests.paths import ROOT

ALPHA, BETA = 1e-5, 1e9
NET = Network("test", ALPHA, BETA)
# One Dense layer 2 -> 2 with bias: A is 3x3, G is 2x2, 6 parameters.
TINY = ModelShape(
    "tiny",
    (InversionUnit("d/A", "d", 3), InversionUnit("d/G", "d", 2)),
    {"d": 6},
)


def triangle(n):
    return n * (n + 1) // 2


# --- the α–β formulas -------------------------------------------------------------
def test_ring_all_reduce_by_hand():
    # 2(N-1)α + 2(N-1)/N · B/β
    assert NET.all_reduce(1000, 2) == pytest.approx(2 * ALPHA + 1000 / BETA)
    assert NET.all_reduce(1000, 4) == pytest.approx(6 * ALPHA + 1.5 * 1000 / BETA)
    # In 3 chunks: three latency terms, the same bandwidth term.
    assert NET.all_reduce(1000, 2, collectives=3) == pytest.approx(6 * ALPHA + 1000 / BETA)


def test_ring_all_gather_and_tree_broadcast_by_hand():
    # (N-1)α + (N-1)/N · N·B_own/β
    assert NET.all_gather(1000, 2) == pytest.approx(ALPHA + 1000 / BETA)
    assert NET.all_gather(1000, 4) == pytest.approx(3 * ALPHA + 3000 / BETA)
    # ⌈log2 N⌉α + B/β
    assert NET.broadcast(1000, 2) == pytest.approx(ALPHA + 1000 / BETA)
    assert NET.broadcast(1000, 5) == pytest.approx(3 * ALPHA + 1000 / BETA)


def test_no_collective_costs_nothing():
    for n_bytes, n in ((0, 8), (1000, 1)):
        assert NET.all_reduce(n_bytes, n) == 0
        assert NET.all_gather(n_bytes, n) == 0
        assert NET.broadcast(n_bytes, n) == 0


def test_network_rejects_bad_parameters():
    with pytest.raises(ValueError, match="beta"):
        Network("x", 1e-5, 0)
    with pytest.raises(ValueError, match="alpha"):
        Network("x", -1.0, 1e9)
    with pytest.raises(ValueError, match="num_replicas"):
        NET.all_reduce(10, 0)


# --- two units on two replicas, by hand --------------------------------------------
def tiny_plan():
    # Balanced on flops: A (27) on replica 0, G (8) on replica 1.
    plan = make_plan(TINY.units, 2, "balanced")
    assert plan.owners == (0, 1)
    return plan


@pytest.mark.parametrize(
    "sharing, sent, buffer, collectives, share_time",
    [
        # Cholesky payloads: A's triangle 6 floats (24 B), G's 3 (12 B).
        ("all_reduce", 36, 36, 1, 2 * ALPHA + 36 / BETA),
        ("all_gather", 24, 48, 1, ALPHA + 24 / BETA),
        ("broadcast", 24, 24, 2, (ALPHA + 24 / BETA) + (ALPHA + 12 / BETA)),
    ],
)
def test_tiny_update_by_hand(sharing, sent, buffer, collectives, share_time):
    traffic = update_traffic(tiny_plan(), "cholesky", sharing)
    # Factor sync: triangles 6 + 3 and the 2 weight sums, 11 floats.
    assert traffic.sync_bytes == 44 and traffic.sync_collectives == 1
    assert traffic.own_bytes == (24, 12)
    assert (traffic.share_sent, traffic.share_buffer, traffic.share_collectives) == (
        sent,
        buffer,
        collectives,
    )
    assert traffic.time(NET) == pytest.approx(2 * ALPHA + 44 / BETA + share_time)
    # The sharing bytes are those the curvature's `inverse_sharing` issues.
    runtime = inverse_sharing(tiny_plan(), "cholesky", sharing=sharing)
    assert (runtime.sent, runtime.buffer, runtime.collectives) == (sent, buffer, collectives)


def test_tiny_sync_in_chunks():
    traffic = update_traffic(tiny_plan(), "cholesky", "all_reduce", sync_chunk_bytes=16)
    # 44 bytes in chunks of 16: 3 collectives, a 16-byte buffer.
    assert (traffic.sync_bytes, traffic.sync_collectives, traffic.sync_buffer) == (44, 3, 16)
    assert traffic.time(NET) == pytest.approx(3 * 2 * ALPHA + 44 / BETA + 2 * ALPHA + 36 / BETA)
    with pytest.raises(ValueError, match="sync_chunk_bytes"):
        update_traffic(tiny_plan(), "cholesky", "all_reduce", sync_chunk_bytes=2)


def test_tiny_cost_and_memory_by_hand():
    cost = communication_cost(TINY, 2, NET, method="eigen", sharing="all_gather", invert_every=1)
    # Gradients: 6 floats all-reduced; nothing distributed at f = 1.
    assert cost.step_s == pytest.approx(2 * ALPHA + 24 / BETA)
    # Eigen payloads: A 9 + 3 = 12 floats (48 B), G 4 + 2 = 6 (24 B).
    assert cost.update.own_bytes == (48, 24)
    assert cost.update_s == pytest.approx(2 * ALPHA + 44 / BETA + ALPHA + 48 / BETA)
    # One slot: the staggered step is a step and a whole update.
    assert cost.staggered_step_s == pytest.approx(cost.step_s + cost.update_s)
    # Factor sums held full: 9 + 4 + 2 weights; inverses 12 + 6; the gather buffer 2 × 48.
    assert cost.memory.factor_sums == 15 * 4
    assert cost.memory.inverses == 18 * 4
    assert cost.memory.transient == 96
    assert cost.memory.total == 60 + 72 + 96


def test_tiny_fully_distributed_by_hand():
    cost = communication_cost(TINY, 2, NET, replication=0.0, invert_every=1)
    assert cost.distribution.owners == {"d": 0}
    # The owner holds both inverses (Cholesky: full 9 + 4), the other none.
    assert cost.distribution.held == (13, 0)
    # Step: the gradients and the preconditioned gradients, 6 floats each.
    assert cost.step_s == pytest.approx(2 * (2 * ALPHA + 24 / BETA))
    # Nothing is shared: the update is the factor sync alone.
    assert cost.update.sharing is None
    assert cost.update_s == pytest.approx(2 * ALPHA + 44 / BETA)


# --- bytes per mode against explicit sums over units ----------------------------------
@pytest.fixture(scope="module")
def bert():
    return bert_shape()


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
@pytest.mark.parametrize("num_replicas", [8, 64])
def test_bytes_per_mode_are_sums_over_units(bert, method, num_replicas):
    distribution = distribute_blocks(bert, num_replicas, method, 0.5)
    plan = replica_owners(bert, distribution, method)
    own = [0] * num_replicas
    for unit, owner in zip(plan.units, plan.owners, strict=True):
        # Distributed blocks' units are not shared, all others are.
        assert (owner is None) == (unit.block in distribution.owners)
        if owner is not None:
            own[owner] += 4 * unit.result_floats(method)
    sync = 4 * (sum(u.factor_floats() for u in bert.units) + 2)
    for sharing in ("all_reduce", "all_gather", "broadcast"):
        traffic = update_traffic(plan, method, sharing)
        assert traffic.sync_bytes == sync
        assert list(traffic.own_bytes) == own
        expected = {
            "all_reduce": (sum(own), sum(own), 1),
            "all_gather": (max(own), num_replicas * max(own), 1),
            "broadcast": (max(own), max(own), sum(b > 0 for b in own)),
        }[sharing]
        assert (traffic.share_sent, traffic.share_buffer, traffic.share_collectives) == expected
        runtime = inverse_sharing(plan, method, sharing=sharing)
        assert (runtime.sent, runtime.buffer, runtime.collectives) == expected


@pytest.mark.parametrize("invert_every", [1, 4, 10])
def test_staggered_slots_split_the_update(bert, invert_every):
    slots = stagger_slots(bert.units, invert_every, "cholesky")
    assert set(slots) == set(range(invert_every))
    plan = replica_owners(bert, distribute_blocks(bert, 8, "cholesky", 1.0), "cholesky")
    whole = update_traffic(plan, "cholesky", "all_reduce")
    parts = []
    for slot in range(invert_every):
        members = [i for i, s in enumerate(slots) if s == slot]
        parts.append(
            update_traffic(
                PlacementPlan(
                    tuple(plan.units[i] for i in members),
                    tuple(plan.owners[i] for i in members),
                    tuple(plan.costs[i] for i in members),
                    8,
                    "balanced",
                ),
                "cholesky",
                "all_reduce",
            )
        )
    # Every slot carries the 2 weight floats; the factors and payloads are split.
    assert sum(p.sync_bytes for p in parts) == whole.sync_bytes + 8 * (invert_every - 1)
    assert sum(p.share_sent for p in parts) == whole.share_sent
    cost = communication_cost(bert, 8, NET, invert_every=invert_every)
    mean = math.fsum(p.time(NET) for p in parts) / invert_every
    assert cost.staggered_step_s == pytest.approx(cost.step_s + mean)


# --- distributed preconditioning ---------------------------------------------------------
def block_inverse(shape, block, method):
    return sum(stored_inverse_floats(u, method) for u in shape.block_units(block))


@pytest.mark.parametrize("num_replicas", [8, 64, 256])
@pytest.mark.parametrize("replication", [0.25, 0.5, 0.75])
def test_distribution_respects_the_memory_bound(bert, num_replicas, replication):
    d = distribute_blocks(bert, num_replicas, "cholesky", replication)
    total = bert.stored_inverse_floats("cholesky")
    assert d.total == total
    assert d.bound == pytest.approx(replication * total + (1 - replication) * total / num_replicas)
    assert d.bound_met and max(d.held) <= d.bound
    # Held: every replicated block's inverses plus the replica's own distributed ones.
    replicated = sum(block_inverse(bert, b, "cholesky") for b in bert.blocks if b not in d.owners)
    for replica in range(num_replicas):
        own = sum(block_inverse(bert, b, "cholesky") for b, r in d.owners.items() if r == replica)
        assert d.held[replica] == replicated + own
    # The distributed blocks are those of the largest ratio (a prefix of that order).
    ratio = {b: block_inverse(bert, b, "cholesky") / bert.block_params[b] for b in bert.blocks}
    assert min(ratio[b] for b in d.owners) >= max(
        ratio[b] for b in bert.blocks if b not in d.owners
    )
    # ... and no more than needed: the last one distributed was above the bound before.
    last = list(d.owners)[-1]
    before = list(d.held)
    before = [h + block_inverse(bert, last, "cholesky") for h in before]
    before[d.owners[last]] -= block_inverse(bert, last, "cholesky")
    assert max(before) > d.bound
    assert d.distributed_params == sum(bert.block_params[b] for b in d.owners)


def test_replication_extremes(bert):
    total = bert.stored_inverse_floats("eigen")
    full = distribute_blocks(bert, 64, "eigen", 1.0)
    assert full.owners == {} and full.held == (total,) * 64 and full.distributed_params == 0
    none = distribute_blocks(bert, 64, "eigen", 0.0)
    assert set(none.owners) == set(bert.blocks)
    assert sum(none.held) == total and none.distributed_params == bert.num_params
    # total/N is out of reach: a FFN block alone holds more than that.
    assert not none.bound_met
    assert max(none.held) < 2 * max(block_inverse(bert, b, "eigen") for b in bert.blocks)
    # One replica holds everything whatever f, and nothing travels.
    one = communication_cost(bert, 1, NET, replication=0.0)
    assert one.distribution.owners == {} and one.step_s == 0 and one.update_s == 0
    with pytest.raises(ValueError, match="replication"):
        distribute_blocks(bert, 8, "eigen", 1.5)


def test_distributed_step_adds_the_preconditioned_gradients(bert):
    for f in (1.0, 0.5, 0.0):
        cost = communication_cost(bert, 64, ETHERNET_100G, replication=f)
        p_dist = cost.distribution.distributed_params
        assert cost.step_bytes == 4 * (bert.num_params + p_dist)
        assert cost.step_s == pytest.approx(
            ETHERNET_100G.all_reduce(4 * bert.num_params, 64)
            + ETHERNET_100G.all_reduce(4 * p_dist, 64)
        )


# --- BERT-Large by hand -----------------------------------------------------------------
def test_bert_large_has_335m_parameters(bert):
    # Hugging Face's BertModel (with the pooler): 335,141,888.
    assert bert.num_params == 335_141_888
    assert bert_shape(pooler=False).num_params == 335_141_888 - (1024 * 1024 + 1024)
    # 3 embeddings (A, G) and their LayerNorm; per layer 4 attention projections and
    # 2 FFN Dense layers (A, G each) and 2 LayerNorms; the pooler (A, G).
    assert len(bert.units) == 3 * 2 + 1 + 24 * (6 * 2 + 2) + 2
    assert len(bert.block_params) == 4 + 24 * 8 + 1


def test_bert_units_by_hand(bert):
    units = {u.name: u for u in bert.units}
    assert units["embeddings/word/A"] == InversionUnit(
        "embeddings/word/A", "embeddings/word", 30522, "diagonal"
    )
    assert units["embeddings/word/G"].dim == 1024
    assert units["layer_0/query/A"].dim == 1025 and units["layer_0/query/G"].dim == 1024
    assert units["layer_23/ffn_intermediate/A"].dim == 1025
    assert units["layer_23/ffn_intermediate/G"].dim == 4096
    assert units["layer_23/ffn_output/A"].dim == 4097
    assert units["layer_5/output_layer_norm/diagonal"].kind == "diagonal"
    assert units["layer_5/output_layer_norm/diagonal"].dim == 2048
    with pytest.raises(ValueError, match="multiple of heads"):
        bert_shape(hidden=100, heads=16)


def test_stored_floats():
    matrix, diagonal = InversionUnit("m", "b", 5), InversionUnit("d", "b", 5, "diagonal")
    grouped = InversionUnit("g", "b", 3, groups=4)
    assert stored_factor_floats(matrix) == 25 and stored_factor_floats(diagonal) == 5
    assert stored_factor_floats(grouped) == 36
    assert stored_inverse_floats(matrix, "cholesky") == 25
    assert stored_inverse_floats(matrix, "eigen") == 30
    assert stored_inverse_floats(diagonal, "eigen") == 5
    assert stored_inverse_floats(grouped, "eigen") == 4 * 12
    assert matrix.result_floats("cholesky") == triangle(5)  # the sharing sends less


def test_model_shape_needs_every_blocks_parameters():
    with pytest.raises(ValueError, match="no parameter count"):
        ModelShape("x", TINY.units, {"other": 3})
    with pytest.raises(ValueError, match="int >= 1"):
        ModelShape("x", TINY.units, {"d": 0})


def test_the_model_imports_without_tensorflow():
    code = (
        "import sys, kfac_dist.placement.communication\n"
        "print(sorted({'tensorflow', 'keras'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
