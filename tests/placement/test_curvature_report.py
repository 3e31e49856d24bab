"""Tests of `Kfac.placement_report`: owners, costs, bytes moved and memory held per replica."""

import functools
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import strategies
from kfac_dist.placement import factor_sync_bytes, format_bytes, inverse_sharing

GLOBAL_BATCH = 8
STEPS = 4
INVERT_EVERY = 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(STEPS * GLOBAL_BATCH, 6, 6, 2)).astype("float32")
Y = RNG.integers(0, 3, size=STEPS * GLOBAL_BATCH)

# The model's factors, by hand: a 3x3 conv with bias on 2 channels (A: 3*3*2+1),
# 3 filters; BatchNormalization over 3 channels (gamma, beta: one diagonal of 6);
# Dense on the 4*4*3 features (A: 48+1) to 4; Dense 4+1 -> 3.
UNITS = ["conv/A", "conv/G", "bn/diagonal", "hidden/A", "hidden/G", "logits/A", "logits/G"]
MATRIX_DIMS = {
    "conv/A": 19,
    "conv/G": 3,
    "hidden/A": 49,
    "hidden/G": 4,
    "logits/A": 5,
    "logits/G": 3,
}
DIAGONAL_DIMS = {"bn/diagonal": 6}
FLOAT = 4  # float32
WEIGHT_FLOATS = 2  # the moving sums of examples and of sample weights

# Owners by hand. Round-robin: unit k on (k + k // N) % N. Balanced, eigen
# flops (4n^3, n for a diagonal): hidden/A alone outweighs all the others.
OWNED = {
    (1, "round_robin"): [UNITS],
    (2, "round_robin"): [
        ["conv/A", "hidden/A", "hidden/G"],
        ["conv/G", "bn/diagonal", "logits/A", "logits/G"],
    ],
    (2, "balanced"): [["hidden/A"], [u for u in UNITS if u != "hidden/A"]],
    (2, "replicated"): [[], []],
}
CASES = [
    (1, "round_robin", "cholesky", "auto"),
    (2, "round_robin", "cholesky", "auto"),
    (2, "round_robin", "cholesky", "all_gather"),
    (2, "balanced", "eigen", "auto"),
    (2, "replicated", "cholesky", "auto"),
]


def triangle(n):
    return n * (n + 1) // 2


def wire_floats(unit, method):
    """Floats of one unit's shared result: a triangle, eigenpairs, or a diagonal."""
    if unit in DIAGONAL_DIMS:
        return DIAGONAL_DIMS[unit]
    n = MATRIX_DIMS[unit]
    return triangle(n) if method == "cholesky" else n + n * n


def expected_bytes(num_replicas, placement, method, sharing):
    """Every byte count of the report, from the layer shapes above."""
    matrices, diagonals = MATRIX_DIMS.values(), sum(DIAGONAL_DIMS.values())
    factors = sum(n * n for n in matrices) + diagonals
    if method == "cholesky":
        inverses = factors
    else:
        inverses = sum(n + n * n for n in matrices) + diagonals
    own = [sum(wire_floats(u, method) for u in owned) for owned in OWNED[num_replicas, placement]]
    if num_replicas == 1 or placement == "replicated":
        sharing, sent, buffer = None, 0, 0
    elif sharing == "all_gather":
        sent, buffer = max(own), num_replicas * max(own)
    else:
        # auto picks the all-gather only when N x the largest <= the total;
        # here one replica owns most of the payload.
        assert num_replicas * max(own) > sum(own)
        sharing, sent, buffer = "all_reduce", sum(own), sum(own)
    return {
        "factors": FLOAT * factors,
        "inverses": FLOAT * inverses,
        "factor_sums": FLOAT * (factors + WEIGHT_FLOATS),
        "sync": FLOAT * (sum(triangle(n) for n in matrices) + diagonals + WEIGHT_FLOATS),
        "sharing": sharing,
        "share": FLOAT * sent,
        "share_buffer": FLOAT * buffer,
    }


def build(num_replicas, placement="round_robin", method="cholesky", sharing="auto"):
    if num_replicas == 1:
        strategy = tf.distribute.get_strategy()
    else:
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(num_replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        keras.utils.set_random_seed(5)
        model = keras.Sequential(
            [
                keras.Input((6, 6, 2)),
                keras.layers.Conv2D(3, 3, name="conv"),
                keras.layers.BatchNormalization(name="bn"),
                keras.layers.Flatten(name="flatten"),
                keras.layers.Dense(4, activation="tanh", name="hidden"),
                keras.layers.Dense(3, name="logits"),
            ]
        )
        opt = kfac.Kfac(
            learning_rate=0.05,
            damping=0.1,
            model=model,
            loss=loss,
            invert_every=INVERT_EVERY,
            inverse_method=method,
            placement=placement,
            inverse_sharing=sharing,
            seed=1,
        )
        model.compile(optimizer=opt, loss=loss)
    return model, opt


@functools.cache
def trained(num_replicas, placement, method, sharing):
    model, opt = build(num_replicas, placement, method, sharing)
    model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return opt


def test_report_needs_a_built_optimizer():
    # A model without an input shape is not built, so neither is its Kfac.
    model = keras.Sequential([keras.layers.Dense(3)])
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")
    with pytest.raises(ValueError, match="needs a built Kfac"):
        opt.placement_report()


@pytest.mark.parametrize("num_replicas, placement, method, sharing", CASES)
def test_report_names_each_replicas_units_and_share(num_replicas, placement, method, sharing):
    info = trained(num_replicas, placement, method, sharing).placement_report(as_dict=True)
    flops = {n: (4 if method == "eigen" else 1) * n**3 for n in MATRIX_DIMS.values()}
    cost = {u: flops[n] for u, n in MATRIX_DIMS.items()} | DIAGONAL_DIMS
    total = sum(cost.values())
    assert info["policy"] == placement
    assert info["num_replicas"] == num_replicas
    assert [u["name"] for u in info["units"]] == UNITS
    assert info["total_cost"] == pytest.approx(total)
    for replica, owned in zip(info["replicas"], OWNED[num_replicas, placement], strict=True):
        assert replica["units"] == owned
        load = total if placement == "replicated" else sum(cost[u] for u in owned)
        assert replica["cost"] == pytest.approx(load)
        assert replica["share"] == pytest.approx(load / total)
    assert info["replicated_units"] == (UNITS if placement == "replicated" else [])


@pytest.mark.parametrize("num_replicas, placement, method, sharing", CASES)
def test_report_bytes_match_the_layer_shapes(num_replicas, placement, method, sharing):
    opt = trained(num_replicas, placement, method, sharing)
    info = json.loads(json.dumps(opt.placement_report(as_dict=True)))
    want = expected_bytes(num_replicas, placement, method, sharing)
    assert (info["inverse_method"], info["dtype"]) == (method, "float32")
    assert info["bytes_per_factor_sync"] == want["sync"]
    assert info["sharing_method"] == want["sharing"]
    assert info["bytes_per_inverse_share"] == want["share"]
    for replica in info["replicas"]:
        memory = replica["memory"]
        assert memory["factor_sums"] == want["factor_sums"]
        assert memory["inverses"] == want["inverses"]
        # One replica syncs nothing; a tiny model's sync is one chunk.
        assert memory["sync_buffer"] == (want["sync"] if num_replicas > 1 else 0)
        assert memory["share_buffer"] == want["share_buffer"]
        assert replica["state_bytes"] == memory["state"]
        # Persistent K-FAC state: one copy of the factors (with the weights)
        # and one of the inverses.
        assert memory["state"] == want["factor_sums"] + want["inverses"]
        assert memory["state"] == FLOAT * WEIGHT_FLOATS + want["factors"] + want["inverses"]


@pytest.mark.parametrize("num_replicas, placement, method, sharing", CASES)
def test_tuner_predicts_the_bytes_of_the_built_optimizer(num_replicas, placement, method, sharing):
    opt = trained(num_replicas, placement, method, sharing)
    info = opt.placement_report(as_dict=True)
    plan = opt.curvature.plan
    assert factor_sync_bytes(plan.units) == info["bytes_per_factor_sync"]
    predicted = inverse_sharing(plan, method, sharing=sharing)
    assert predicted.method == info["sharing_method"]
    assert predicted.sent == info["bytes_per_inverse_share"]
    assert predicted.buffer == info["replicas"][0]["memory"]["share_buffer"]


@pytest.mark.parametrize("num_replicas, placement, method, sharing", CASES)
def test_report_bytes_equal_what_the_collectives_counted(num_replicas, placement, method, sharing):
    opt = trained(num_replicas, placement, method, sharing)
    info = opt.placement_report(as_dict=True)
    for replica in range(num_replicas):
        counts = opt.context.counts(replica)
        sync = counts[strategies.FACTOR_SYNC]
        # One replica has nothing to exchange: its sync issues no collective.
        assert sync["calls"] == (STEPS // INVERT_EVERY if num_replicas > 1 else 0)
        assert sync["bytes"] == sync["calls"] * info["bytes_per_factor_sync"]
        share = counts[strategies.INVERSE_SHARE]
        if info["bytes_per_inverse_share"]:
            assert share["calls"] == STEPS // INVERT_EVERY
        else:
            assert share["calls"] == 0
        assert share["bytes"] == share["calls"] * info["bytes_per_inverse_share"]


def test_report_table_shows_owners_bytes_and_memory():
    opt = trained(2, "round_robin", "cholesky", "auto")
    want = expected_bytes(2, "round_robin", "cholesky", "auto")
    lines = opt.placement_report().splitlines()
    assert lines[0].split() == [
        "replica",
        "units",
        "cost",
        "share",
        "state",
        "buffers",
        "owned",
        "units",
    ]
    state = format_bytes(want["factor_sums"] + want["inverses"])
    buffers = format_bytes(want["sync"] + want["share_buffer"])
    for replica, owned in enumerate(OWNED[2, "round_robin"]):
        row = lines[2 + replica]
        assert row.split()[:2] == [str(replica), str(len(owned))]
        assert f"  {state}  {buffers}  " in row
        assert row.endswith(", ".join(owned))
    text = "\n".join(lines)
    assert f"factor sync {format_bytes(want['sync'])} per sync" in text
    assert (
        f"inverse sharing {format_bytes(want['share'])} per inverse update "
        "(all_reduce, 1 collective)" in text
    )
    assert opt.placement_report(as_dict=True)["sharing_collectives"] == 1
    assert f"memory per replica: state {state} (factor sums " in text
