"""The curvature state against NumPy: fold, factors, inverses, fallbacks and sharing,
with grouped factors (a leading axis of equal members) beside ungrouped ones.

The blocks: a Dense block (A 5×5, G 3×3), a depthwise block (A (3, 5, 5), G
(3, 2, 2): one pair per channel), a stub with a grouped diagonal A (3, 3) —
the shape of the Dense G, which it must never be stacked with — and a
grouped G (3, 2, 2), and a diagonal block (4,).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist import strategies
from kfac_dist.blocks import (
    CHOLESKY,
    EIGEN,
    Block,
    DenseBlock,
    DepthwiseConvBlock,
    GenericDiagonalBlock,
    KronPart,
)
from kfac_dist.curvature import Curvature

DAMPING = 0.25
DECAY = 0.75
RNG = np.random.default_rng(0)


class GroupedDiagonalStub(Block):
    """A Kronecker block with a grouped diagonal A: 3 members of (3,), G 3 members of 2×2."""

    def kron_parts(self):
        return [KronPart("", (3,), 2, 3)]


def _blocks():
    dense = keras.layers.Dense(3, name="dense")
    dense.build((None, 4))
    depthwise = keras.layers.DepthwiseConv2D(2, depth_multiplier=2, name="depthwise_conv2d")
    depthwise.build((None, 4, 4, 3))
    return [
        DenseBlock(dense),
        DepthwiseConvBlock(depthwise),
        GroupedDiagonalStub("stub", []),
        GenericDiagonalBlock("diag", [keras.Variable(np.zeros(4))]),
    ]


def _spd(n, scale=1.0):
    x = RNG.normal(size=(2 * n, n))
    return scale * x.T @ x / (2 * n)


def _random_factor(shape, groups):
    """A factor of `shape`: SPD matrices or positive vectors, member by member."""
    members = shape[1:] if groups else shape
    count = groups or 1
    if len(members) == 2:
        out = np.stack([_spd(members[0], RNG.uniform(0.5, 2.0)) for _ in range(count)])
    else:
        out = RNG.uniform(0.2, 2.0, size=(count, *members))
    return out if groups else out[0]


def _statistics(blocks):
    return [
        _random_factor(shape, groups)
        for block in blocks
        for shape, groups in zip(block.factor_shapes(), block.group_counts())
    ]


def _members(factor, groups):
    return list(factor) if groups else [factor]


def _mean(member):
    return np.mean(np.diag(member)) if member.ndim == 2 else np.mean(member)


def numpy_payloads(blocks, factors, method):
    """Each factor's payload, member by member, as NumPy computes it."""
    out = []
    position = 0
    for block in blocks:
        groups = block.group_counts()
        count = len(groups)
        mine = factors[position : position + count]
        position += count
        if method == EIGEN:
            for factor, g in zip(mine, groups):
                out.append([np.linalg.eigh(m) if m.ndim == 2 else m for m in _members(factor, g)])
            continue
        if count == 1:  # diagonal or full: λ
            (factor,) = mine
            out.append([_damped_inverse(m, DAMPING) for m in _members(factor, groups[0])])
            continue
        a_members, g_members = _members(mine[0], groups[0]), _members(mine[1], groups[1])
        a_inv, g_inv = [], []
        for a, g in zip(a_members, g_members):
            pi = np.sqrt(_mean(a) / _mean(g))
            a_inv.append(_damped_inverse(a, pi * np.sqrt(DAMPING)))
            g_inv.append(_damped_inverse(g, np.sqrt(DAMPING) / pi))
        out += [a_inv, g_inv]
    return out


def _damped_inverse(member, damping):
    if member.ndim == 1:
        return 1.0 / (member + damping)
    return np.linalg.inv(member + damping * np.eye(len(member)))


def assert_payloads_match(curvature, payloads, expected, method):
    """`payloads` (per factor, per payload tensor) equal NumPy's `expected` member by member."""
    for unit, got, want in zip(curvature.units, payloads, expected):
        grouped = unit.groups > 1
        if method == CHOLESKY:
            (inverse,) = got
            members = list(inverse) if grouped else [inverse]
            for m, w in zip(members, want):
                np.testing.assert_allclose(m, w, rtol=1e-9, atol=1e-12, err_msg=unit.name)
            continue
        values, vectors = got
        values = list(values) if grouped else [values]
        if unit.kind == "diagonal":
            assert np.shape(vectors) == (0, 0)
            for v, w in zip(values, want):
                np.testing.assert_allclose(v, w, rtol=1e-12, err_msg=unit.name)
            continue
        vectors = list(vectors) if grouped else [vectors]
        for v, q, (w_values, w_vectors) in zip(values, vectors, want):
            np.testing.assert_allclose(v, w_values, rtol=1e-9, atol=1e-12, err_msg=unit.name)
            rebuilt = q @ np.diag(v) @ q.T
            np.testing.assert_allclose(
                rebuilt, w_vectors @ np.diag(w_values) @ w_vectors.T, rtol=1e-9, atol=1e-12
            )


def _plain_variable(shape, name, dtype=None):
    return keras.Variable(
        initializer="zeros", shape=shape, dtype=dtype or "float64", trainable=False, name=name
    )


def single_replica_curvature(blocks, method, decay=DECAY):
    context = strategies.SingleReplicaContext(tf.distribute.get_strategy())
    curvature = Curvature(
        blocks, context, inverse_method=method, placement="round_robin", cov_ema_decay=decay
    )
    curvature.build(_plain_variable)
    return curvature


def test_units_variables_and_stacks_of_grouped_and_ungrouped_factors(float64):
    blocks = _blocks()
    curvature = single_replica_curvature(blocks, EIGEN)
    units = [(u.name, u.dim, u.kind, u.groups) for u in curvature.units]
    assert units == [
        ("dense/A", 5, "matrix", 1),
        ("dense/G", 3, "matrix", 1),
        ("depthwise_conv2d/A", 5, "matrix", 3),
        ("depthwise_conv2d/G", 2, "matrix", 3),
        ("stub/A", 3, "diagonal", 3),
        ("stub/G", 2, "matrix", 3),
        ("diag/diagonal", 4, "diagonal", 1),
    ]
    # One variable per grouped factor, with its group axis.
    shapes = [tuple(v.shape) for v in curvature.factor_sums]
    assert shapes == [(5, 5), (3, 3), (3, 5, 5), (3, 2, 2), (3, 3), (3, 2, 2), (4,)]
    assert [[tuple(v.shape) for v in p] for p in curvature.payloads] == [
        [(5,), (5, 5)],
        [(3,), (3, 3)],
        [(3, 5), (3, 5, 5)],
        [(3, 2), (3, 2, 2)],
        [(3, 3), (0, 0)],
        [(3, 2), (3, 2, 2)],
        [(4,), (0, 0)],
    ]
    # The grouped diagonal (3, 3) is not stacked with the Dense G (3, 3); the
    # two grouped G (3, 2, 2) are.
    assert sorted(curvature.factor_groups) == [[0], [1], [2], [3, 5], [4], [6]]


def test_two_folds_give_the_decayed_sums_and_factors_are_their_debiased_average(float64):
    blocks = _blocks()
    curvature = single_replica_curvature(blocks, CHOLESKY)
    first, second = _statistics(blocks), _statistics(blocks)
    (b1, b2), weight_total = (4.0, 6.0), 9.0  # the second batch's sample weights sum to 9
    curvature.fold(
        curvature.batch_statistics([tf.constant(s) for s in first], tf.constant(b1)),
        tf.constant(True),
    )
    curvature.fold(
        curvature.batch_statistics(
            [tf.constant(s) for s in second], tf.constant(b2), tf.constant(weight_total)
        ),
        tf.constant(True),
    )
    examples = DECAY * (1 - DECAY) * b1 + (1 - DECAY) * b2
    weights = DECAY * (1 - DECAY) * b1 + (1 - DECAY) * weight_total
    np.testing.assert_allclose(curvature.weight_sum.numpy(), [examples, weights], rtol=1e-12)
    weighted = [w for block in blocks for w in block.weighted_factors()]
    assert weighted == [True, False, True, False, True, False, False]
    for sums, factor, f1, f2, is_weighted in zip(
        curvature.factor_sums, curvature.factors(), first, second, weighted
    ):
        want = DECAY * (1 - DECAY) * b1 * f1 + (1 - DECAY) * b2 * f2
        np.testing.assert_allclose(sums.numpy(), want, rtol=1e-12)
        # The input factors carry the sample weights: divided by the mean weight.
        mean_weight = weights / examples if is_weighted else 1.0
        np.testing.assert_allclose(factor.numpy(), want / examples / mean_weight, rtol=1e-12)


def _fold_once(curvature, statistics, batch):
    curvature.fold(
        curvature.batch_statistics([tf.constant(s) for s in statistics], tf.constant(batch)),
        tf.constant(True),
    )


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_update_inverses_on_one_replica_gives_numpys_payloads(float64, method):
    blocks = _blocks()
    curvature = single_replica_curvature(blocks, method, decay=0.0)
    statistics = _statistics(blocks)
    _fold_once(curvature, statistics, 8.0)
    tf.function(lambda: curvature.update_inverses(DAMPING), autograph=False)()
    payloads = [[v.numpy() for v in p] for p in curvature.payloads]
    assert_payloads_match(curvature, payloads, numpy_payloads(blocks, statistics, method), method)
    # One inversion per unit (a grouped factor is one), none failed.
    assert int(curvature.inversions.numpy()) == len(curvature.units)
    assert int(curvature.inversion_failures.numpy()) == 0


def test_a_fold_that_would_overflow_keeps_that_factors_sum_and_no_copy_is_kept(float64):
    blocks = _blocks()
    curvature = single_replica_curvature(blocks, CHOLESKY)
    statistics = _statistics(blocks)
    _fold_once(curvature, statistics, 8.0)
    before = [v.numpy().copy() for v in curvature.factor_sums]
    # Finite statistics whose fold overflows one member of the grouped depthwise A.
    huge = [s.copy() for s in statistics]
    huge[2][1, 0, 0] = 1e308
    _fold_once(curvature, huge, 8.0)
    np.testing.assert_array_equal(curvature.factor_sums[2].numpy(), before[2])
    decay = curvature.cov_ema_decay
    for f in [f for f in range(len(before)) if f != 2]:
        want = decay * before[f] + (1 - decay) * 8.0 * statistics[f]
        np.testing.assert_allclose(curvature.factor_sums[f].numpy(), want, rtol=1e-12)
    assert int(curvature.skipped_statistics.numpy()) == 1
    assert bool(curvature.sync())
    # One copy of the factors: the sums, the weights, the inverses, nothing else.
    names = [v.name for v in curvature.factor_sums]
    assert not [n for n in names if "good" in n]
    assert not hasattr(curvature, "good_sums")


def test_a_member_whose_inverse_fails_keeps_its_previous_inverse_alone(float64):
    blocks = _blocks()
    curvature = single_replica_curvature(blocks, CHOLESKY, decay=0.0)
    statistics = _statistics(blocks)
    _fold_once(curvature, statistics, 8.0)
    update = tf.function(lambda: curvature.update_inverses(DAMPING), autograph=False)
    update()
    before = curvature.payloads[2][0].numpy().copy()
    # Member 1 of the depthwise A becomes indefinite beyond any retry's damping.
    changed = [s.copy() for s in statistics]
    changed[2] = changed[2] * 2.0
    changed[2][1] = np.diag([-1e12, 1.0, 1.0, 1.0, 1.0])
    _fold_once(curvature, changed, 8.0)
    update()
    after = curvature.payloads[2][0].numpy()
    np.testing.assert_array_equal(after[1], before[1])
    want = numpy_payloads(blocks, changed, CHOLESKY)[2]
    for c in (0, 2):
        np.testing.assert_allclose(after[c], want[c], rtol=1e-9)
        assert not np.allclose(after[c], before[c])
    assert int(curvature.inversion_failures.numpy()) == 1


def _mirrored_variable(shape, name, dtype=None):
    """Per-replica state, as `curvature.per_replica_variable` makes it for an optimizer."""
    return keras.Variable(
        initializer="zeros",
        shape=shape,
        dtype=dtype or "float64",
        trainable=False,
        aggregation="only_first_replica",
        synchronization="on_read",
        name=name,
    )


@pytest.mark.parametrize("sharing", ["all_reduce", "all_gather", "broadcast"])
@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_every_mirrored_replica_ends_with_numpys_payloads(float64, method, sharing):
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    blocks = _blocks()
    with strategy.scope():
        curvature = Curvature(
            blocks,
            strategies.resolve(strategy),
            inverse_method=method,
            placement="round_robin",
            cov_ema_decay=0.5,
            sharing=sharing,
        )
        curvature.build(_mirrored_variable)
    assert curvature.sharing_method == sharing
    assert {curvature.plan.owners[u] for u in curvature.shared_units} == {0, 1}
    per_replica = [_statistics(blocks), _statistics(blocks)]
    batches = [3.0, 5.0]
    stacked = [tf.constant(np.stack(pair)) for pair in zip(*per_replica)]

    @tf.function(autograph=False)
    def fold_and_update():
        def step():
            replica = curvature.context.replica_id()
            statistics = [tf.gather(s, replica) for s in stacked]
            batch = tf.gather(tf.constant(batches, tf.float64), replica)
            curvature.fold(curvature.batch_statistics(statistics, batch), tf.constant(True))
            curvature.update_inverses(DAMPING)
            return [[tf.identity(v.value) for v in p] for p in curvature.payloads]

        return strategy.run(step)

    results = fold_and_update()
    # The synced factors are the example-weighted mean of the replicas' statistics.
    factors = [(batches[0] * s0 + batches[1] * s1) / sum(batches) for s0, s1 in zip(*per_replica)]
    expected = numpy_payloads(blocks, factors, method)
    replicas = [
        [[strategy.experimental_local_results(t)[r].numpy() for t in p] for p in results]
        for r in range(2)
    ]
    for r in range(2):
        assert_payloads_match(curvature, replicas[r], expected, method)
    for p0, p1 in zip(*replicas):
        for t0, t1 in zip(p0, p1):
            np.testing.assert_array_equal(t0, t1)
    # Each replica inverted only the units it owns.
    counts = [int(c) for c in strategy.experimental_local_results(curvature.inversions.value)]
    assert counts == [len(curvature.plan.owned_by(r)) for r in range(2)]
