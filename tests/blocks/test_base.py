"""kfac_dist.blocks.base against NumPy: every block's damping at once, grouped inversion."""

import numpy as np
import tensorflow as tf

from kfac_dist.blocks import (
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    KRON,
    Block,
    KronPart,
    factor_dampings,
    invert_factors,
)

RNG = np.random.default_rng(0)
DAMPING = 0.25  # float32-exact: hyperparameters are float32


def _spd(n: int, scale: float = 1.0) -> np.ndarray:
    x = RNG.normal(size=(2 * n, n))
    return scale * x.T @ x / (2 * n)


def test_factor_dampings_split_kronecker_blocks_by_pi_and_leave_others_at_lambda():
    blocks = [Block("a", [], KRON), Block("d", [], DIAGONAL), Block("b", [], KRON)]
    # Factor order: a/A, a/G, d, b/A, b/G. b's G is all zero: π falls back to 1.
    means = np.array([2.0, 0.5, 7.0, 3.0, 0.0])
    got = factor_dampings(blocks, tf.constant(means), DAMPING).numpy()
    root, pi_a = np.sqrt(DAMPING), np.sqrt(2.0 / 0.5)
    np.testing.assert_allclose(got, [pi_a * root, root / pi_a, DAMPING, root, root], rtol=1e-12)


def test_invert_factors_of_mixed_shapes_match_numpy_inverses_in_order():
    factors = [_spd(3), _spd(2), np.abs(RNG.normal(size=4)), _spd(3, 5.0), _spd(2, 0.1)]
    dampings = np.array([0.25, 0.5, 0.125, 1.0, 0.0625])
    payloads, retries = invert_factors(
        [tf.constant(f) for f in factors], tf.constant(dampings), CHOLESKY
    )
    for (inverse,), factor, damping in zip(payloads, factors, dampings):
        if factor.ndim == 1:
            expected = 1.0 / (factor + damping)
        else:
            expected = np.linalg.inv(factor + damping * np.eye(len(factor)))
        np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-10)
    assert [int(r) for r in retries] == [0] * len(factors)


def test_invert_factors_in_stacks_of_bounded_bytes_one_after_the_other(float64):
    """Three 3×3 factors (72 bytes each) and a 2×2 under a 144-byte bound: stacks 2, 1, 1."""
    factors = [_spd(3), _spd(3, 2.0), _spd(3, 0.5), _spd(2)]
    dampings = np.array([0.25, 0.5, 0.125, 1.0])

    @tf.function
    def inverses(limit: int | None) -> list[tf.Tensor]:
        payloads, _ = invert_factors(
            [tf.constant(f) for f in factors],
            tf.constant(dampings),
            CHOLESKY,
            max_stack_bytes=limit,
        )
        return [p[0] for p in payloads]

    for limit, stacks in ((None, 2), (144, 3)):
        got = inverses(limit)
        for inverse, factor, damping in zip(got, factors, dampings):
            expected = np.linalg.inv(factor + damping * np.eye(len(factor)))
            np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-10)
        graph = inverses.get_concrete_function(limit).graph
        assert sum(op.type == "Cholesky" for op in graph.get_operations()) == stacks
        # Each stack after the first waits for the one before it.
        packs = [op for op in graph.get_operations() if op.type == "Pack" and op.inputs]
        assert sum(bool(op.control_inputs) for op in packs) == stacks - 1


def test_invert_factors_eigen_payloads_rebuild_each_factor():
    factors = [_spd(3), _spd(2), _spd(3, 2.0)]
    payloads, _ = invert_factors([tf.constant(f) for f in factors], None, EIGEN)
    for (values, vectors), factor in zip(payloads, factors):
        rebuilt = vectors.numpy() @ np.diag(values.numpy()) @ vectors.numpy().T
        np.testing.assert_allclose(rebuilt, factor, rtol=1e-10, atol=1e-12)


def test_block_invert_of_a_full_block_uses_lambda():
    factor = _spd(3)
    (inverse,), retries = Block("f", [], FULL).invert(0, [tf.constant(factor)], DAMPING, CHOLESKY)
    np.testing.assert_allclose(
        inverse.numpy(), np.linalg.inv(factor + DAMPING * np.eye(3)), rtol=1e-10
    )
    assert int(retries) == 0


class GroupedStub(Block):
    """A Kronecker block of two member pairs: A (2, 3, 3), G (2, 2, 2)."""

    def kron_parts(self):
        return [KronPart("", (3, 3), 2, 2)]


def test_factor_dampings_give_each_member_pair_of_a_grouped_block_its_own_pi():
    blocks = [GroupedStub("g", [], KRON), Block("d", [], DIAGONAL), Block("a", [], KRON)]
    assert blocks[0].member_counts() == [2, 2]
    assert blocks[0].damping_rows() == [[0, 2], [1, 3]]
    # Member order: g/A₀, g/A₁, g/G₀, g/G₁, d, a/A, a/G (a's G is zero: π = 1).
    means = np.array([2.0, 9.0, 0.5, 1.0, 7.0, 3.0, 0.0])
    got = factor_dampings(blocks, tf.constant(means), DAMPING).numpy()
    root = np.sqrt(DAMPING)
    want = [2 * root, 3 * root, root / 2, root / 3, DAMPING, root, root]
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_invert_factors_of_grouped_factors_damp_and_retry_each_member():
    indefinite = np.diag([-1.0, 2.0, 3.0])  # + 0.5 is indefinite, + 5 is not
    grouped = np.stack([_spd(3), indefinite])
    factors = [grouped, _spd(3), np.abs(RNG.normal(size=(2, 4))), np.abs(RNG.normal(size=4))]
    groups = [2, None, 2, None]
    # One damping per member, in member order.
    dampings = np.array([0.25, 0.5, 0.125, 1.0, 0.0625, 0.75])
    payloads, retries = invert_factors(
        [tf.constant(f) for f in factors], tf.constant(dampings), CHOLESKY, groups
    )
    members = [grouped[0], grouped[1], factors[1], *factors[2], factors[3]]
    want = []
    for i, (member, damping) in enumerate(zip(members, dampings)):
        if member.ndim == 1:
            want.append(1.0 / (member + damping))
        else:
            extra = damping * (10.0 if i == 1 else 1.0)  # the indefinite member retried once
            want.append(np.linalg.inv(member + extra * np.eye(3)))
    got = [*payloads[0][0].numpy(), payloads[1][0].numpy(), *payloads[2][0].numpy()]
    got.append(payloads[3][0].numpy())
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10)
    assert [tuple(p[0].shape) for p in payloads] == [(2, 3, 3), (3, 3), (2, 4), (4,)]
    assert [int(r) for r in retries] == [1, 0, 0, 0]


def test_invert_factors_eigen_payloads_of_grouped_factors_are_stacked():
    grouped = np.stack([_spd(3), _spd(3, 2.0)])
    diagonal = np.abs(RNG.normal(size=(2, 4)))
    payloads, _ = invert_factors([tf.constant(grouped), tf.constant(diagonal)], None, EIGEN, [2, 2])
    (values, vectors), (diagonal_values, empty) = payloads
    assert tuple(values.shape) == (2, 3) and tuple(vectors.shape) == (2, 3, 3)
    for v, q, member in zip(values.numpy(), vectors.numpy(), grouped):
        np.testing.assert_allclose(q @ np.diag(v) @ q.T, member, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(diagonal_values.numpy(), diagonal)
    assert tuple(empty.shape) == (0, 0)
