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
