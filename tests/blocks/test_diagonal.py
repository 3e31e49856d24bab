"""GenericDiagonalBlock against NumPy: Σ_C grad² / b, and its damped inverse."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import CHOLESKY, DIAGONAL, EIGEN, GenericDiagonalBlock

B, C = 6, 3
SHAPES = [(3, 2), (4,)]


@pytest.fixture(scope="module")
def block():
    variables = [keras.Variable(np.zeros(s, np.float32)) for s in SHAPES]
    return GenericDiagonalBlock("generic", variables)


@pytest.fixture(scope="module")
def column_grads():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(C, *s)) for s in SHAPES]


def test_generic_statistics_are_squared_gradients_summed_over_columns(block, column_grads):
    (stat,) = block.statistics([], [tf.constant(g, tf.float32) for g in column_grads], B)
    flat = np.concatenate([g.reshape(C, -1) for g in column_grads], axis=1)
    expected = np.sum(flat**2, axis=0) / B
    assert block.factor_shapes() == [(10,)] and stat.shape == (10,)
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-6)
    # Variables in order, each flattened row-major.
    np.testing.assert_allclose(
        stat.numpy()[:6],
        np.sum(column_grads[0] ** 2, axis=0).ravel() / B,
        rtol=1e-6,
    )


def test_generic_statistics_with_one_column_are_squared_gradient_over_batch(block):
    grads = [np.full((1, *s), 3.0) for s in SHAPES]
    (stat,) = block.statistics([], [tf.constant(g, tf.float32) for g in grads], B)
    np.testing.assert_allclose(stat.numpy(), np.full(10, 9.0 / B), rtol=1e-6)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_generic_precondition_divides_by_damped_diagonal(block, method):
    rng = np.random.default_rng(1)
    factor = rng.uniform(0.0, 2.0, size=10)
    damping = 0.05
    payload, retries = block.invert(0, [tf.constant(factor, tf.float32)], damping, method)
    assert int(retries) == 0
    grads = [rng.normal(size=s) for s in SHAPES]
    out = block.precondition(
        [tf.constant(g, tf.float32) for g in grads], [payload], damping, method
    )
    flat = np.concatenate([g.ravel() for g in grads])
    expected = np.linalg.solve(np.diag(factor) + damping * np.eye(10), flat)
    assert [tuple(o.shape) for o in out] == SHAPES
    np.testing.assert_allclose(
        np.concatenate([o.numpy().ravel() for o in out]), expected, rtol=1e-5
    )


def test_generic_block_is_diagonal_only():
    variables = [keras.Variable(np.zeros(3, np.float32))]
    assert GenericDiagonalBlock("g", variables).approx == DIAGONAL
    with pytest.raises(ValueError, match="fisher_approx"):
        GenericDiagonalBlock("g", variables, "full")
