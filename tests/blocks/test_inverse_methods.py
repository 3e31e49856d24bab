"""The inverse methods against NumPy: batched inversion, payload shapes, and each solve."""

import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import (
    CHOLESKY,
    EIGEN,
    INVERSE_METHOD_OF,
    INVERSE_METHODS,
    Cholesky,
    Eigen,
    InverseMethod,
    inverse_method,
)

RNG = np.random.default_rng(0)
CHOL, EIG = Cholesky(), Eigen()


def _spd(n: int, scale: float = 1.0) -> np.ndarray:
    x = RNG.normal(size=(2 * n, n))
    return scale * x.T @ x / (2 * n)


def _constants(arrays):
    return [tf.constant(a, tf.float64) for a in arrays]


def test_registry_holds_one_instance_per_inverse_method_option():
    assert tuple(INVERSE_METHOD_OF) == INVERSE_METHODS
    assert isinstance(inverse_method("cholesky"), Cholesky)
    assert isinstance(inverse_method(EIGEN), Eigen)
    assert inverse_method(CHOL) is CHOL
    assert all(isinstance(m, InverseMethod) for m in INVERSE_METHOD_OF.values())
    assert INVERSE_METHOD_OF[CHOLESKY].needs_factor_damping
    assert not INVERSE_METHOD_OF[EIGEN].needs_factor_damping
    with pytest.raises(ValueError, match="Unknown inverse method 'lu'"):
        inverse_method("lu")


def test_payload_shapes_of_full_and_diagonal_factors():
    assert CHOL.payload_shapes((5, 5)) == [(5, 5)]
    assert CHOL.payload_shapes((7,)) == [(7,)]
    assert EIG.payload_shapes((5, 5)) == [(5,), (5, 5)]
    assert EIG.payload_shapes((7,)) == [(7,), (0, 0)]


def test_cholesky_inverts_each_factor_of_a_stack_with_its_own_damping():
    factors = [_spd(4), _spd(4, 3.0), _spd(4, 0.01)]
    dampings = np.array([0.5, 0.125, 2.0])
    payloads, retries = CHOL.invert(_constants(factors), tf.constant(dampings))
    assert len(payloads) == len(retries) == 3
    for (inverse,), factor, damping in zip(payloads, factors, dampings, strict=True):
        expected = np.linalg.inv(factor + damping * np.eye(4))
        np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-10)
    assert [int(r) for r in retries] == [0, 0, 0]
    assert [[tuple(p.shape) for p in payload] for payload in payloads] == [
        CHOL.payload_shapes((4, 4))
    ] * 3


def test_cholesky_inverts_diagonal_factors_elementwise():
    factors = [np.array([0.0, 1.0, 4.0]), np.array([2.0, 0.5, 0.25])]
    payloads, retries = CHOL.invert(_constants(factors), tf.constant([0.5, 0.25], tf.float64))
    np.testing.assert_allclose(payloads[0][0].numpy(), [2.0, 1 / 1.5, 1 / 4.5], rtol=1e-12)
    np.testing.assert_allclose(payloads[1][0].numpy(), [1 / 2.25, 1 / 0.75, 2.0], rtol=1e-12)
    assert [int(r) for r in retries] == [0, 0]


def test_cholesky_retries_only_the_factor_that_is_not_positive_definite():
    indefinite = np.diag([-1.0, 2.0, 3.0])  # + 0.5 is indefinite, + 5 is not
    factors = [_spd(3), indefinite]
    payloads, retries = CHOL.invert(_constants(factors), tf.constant([0.5, 0.5], tf.float64))
    assert [int(r) for r in retries] == [0, 1]
    np.testing.assert_allclose(
        payloads[0][0].numpy(), np.linalg.inv(factors[0] + 0.5 * np.eye(3)), rtol=1e-10
    )
    np.testing.assert_allclose(
        payloads[1][0].numpy(), np.linalg.inv(indefinite + 5.0 * np.eye(3)), rtol=1e-10
    )


def test_cholesky_without_dampings_is_an_error():
    with pytest.raises(ValueError, match="damping"):
        CHOL.invert(_constants([_spd(2)]), None)


def test_eigen_decomposition_reconstructs_each_factor_and_clips_negative_eigenvalues():
    rotation, _ = np.linalg.qr(RNG.normal(size=(3, 3)))
    indefinite = rotation @ np.diag([-0.25, 1.0, 2.0]) @ rotation.T
    factors = [_spd(3), _spd(3, 4.0), indefinite]
    payloads, retries = EIG.invert(_constants(factors), None)
    assert [int(r) for r in retries] == [0, 0, 0]
    for (values, vectors), factor in zip(payloads[:2], factors[:2], strict=True):
        v = vectors.numpy()
        np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)
        rebuilt = v @ np.diag(values.numpy()) @ v.T
        np.testing.assert_allclose(rebuilt, factor, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(values.numpy(), np.linalg.eigvalsh(factor), rtol=1e-10)
    np.testing.assert_allclose(payloads[2][0].numpy(), [0.0, 1.0, 2.0], atol=1e-12)


def test_eigen_of_diagonal_factors_is_the_clipped_diagonal_with_no_vectors():
    payloads, _ = EIG.invert(_constants([np.array([3.0, -1.0, 0.5])]), None)
    ((values, vectors),) = payloads
    np.testing.assert_array_equal(values.numpy(), [3.0, 0.0, 0.5])
    assert tuple(vectors.shape) == (0, 0)


# --- solves: (F + λI)⁻¹ v and the damped Kronecker solve ----------------------

DAMPING = 0.3


def _payload(method: InverseMethod, factor: np.ndarray, damping: float):
    payloads, _ = method.invert(_constants([factor]), tf.constant([damping], tf.float64))
    return payloads[0]


@pytest.mark.parametrize("method", [CHOL, EIG], ids=["cholesky", "eigen"])
@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diagonal"])
def test_solve_applies_the_damped_inverse_to_a_vector(method, diagonal):
    factor = RNG.uniform(0.1, 2.0, size=6) if diagonal else _spd(6)
    vector = RNG.normal(size=6)
    payload = _payload(method, factor, DAMPING)
    got = method.solve(payload, tf.constant(vector), tf.constant(DAMPING, tf.float64))
    matrix = np.diag(factor) if diagonal else factor
    expected = np.linalg.solve(matrix + DAMPING * np.eye(6), vector)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_eigen_solve_takes_a_new_damping_without_a_new_decomposition():
    factor, vector = _spd(4), RNG.normal(size=4)
    payload = _payload(EIG, factor, DAMPING)
    for damping in (0.01, 1.0, 10.0):
        got = EIG.solve(payload, tf.constant(vector), tf.constant(damping, tf.float64))
        expected = np.linalg.solve(factor + damping * np.eye(4), vector)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("diagonal_input", [False, True], ids=["full_a", "diagonal_a"])
def test_cholesky_kronecker_solve_is_both_damped_inverses_around_the_matrix(diagonal_input):
    a = RNG.uniform(0.1, 2.0, size=4) if diagonal_input else _spd(4)
    g, matrix = _spd(3), RNG.normal(size=(4, 3))
    d_a, d_g = 0.2, 0.7
    got = CHOL.solve_kronecker(
        _payload(CHOL, a, d_a),
        _payload(CHOL, g, d_g),
        tf.constant(matrix),
        tf.constant(DAMPING, tf.float64),
    )
    dense_a = np.diag(a) if diagonal_input else a
    inverse_a = np.linalg.inv(dense_a + d_a * np.eye(4))
    expected = inverse_a @ matrix @ np.linalg.inv(g + d_g * np.eye(3))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


@pytest.mark.parametrize("diagonal_input", [False, True], ids=["full_a", "diagonal_a"])
def test_eigen_kronecker_solve_is_the_exactly_damped_kronecker_system(diagonal_input):
    a = RNG.uniform(0.1, 2.0, size=4) if diagonal_input else _spd(4)
    g, matrix = _spd(3), RNG.normal(size=(4, 3))
    got = EIG.solve_kronecker(
        _payload(EIG, a, 0.0),
        _payload(EIG, g, 0.0),
        tf.constant(matrix),
        tf.constant(DAMPING, tf.float64),
    )
    dense_a = np.diag(a) if diagonal_input else a
    # Row-major vec: vec(A X G) = (A ⊗ G) vec(X) for symmetric G.
    system = np.kron(dense_a, g) + DAMPING * np.eye(12)
    expected = np.linalg.solve(system, matrix.reshape(-1)).reshape(4, 3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_payload_shapes_of_grouped_factors_stack_each_members():
    assert CHOL.payload_shapes((3, 5, 5), 3) == [(3, 5, 5)]
    assert CHOL.payload_shapes((3, 5), 3) == [(3, 5)]
    assert EIG.payload_shapes((3, 5, 5), 3) == [(3, 5), (3, 5, 5)]
    assert EIG.payload_shapes((3, 5), 3) == [(3, 5), (0, 0)]
    # Without groups, the shape is the factor's own.
    assert EIG.payload_shapes((5, 5)) == [(5,), (5, 5)]


@pytest.mark.parametrize("method", [CHOL, EIG], ids=["cholesky", "eigen"])
@pytest.mark.parametrize("diagonal_input", [False, True], ids=["full_a", "diagonal_a"])
def test_grouped_kronecker_solve_is_each_members_solve(method, diagonal_input):
    groups = 3
    a_members = [RNG.uniform(0.1, 2.0, size=4) if diagonal_input else _spd(4) for _ in range(3)]
    g_members = [_spd(2) for _ in range(groups)]
    matrices = RNG.normal(size=(groups, 4, 2))
    dampings = tf.constant([0.2] * groups, tf.float64)
    a_payload, _ = method.invert_stack(tf.constant(np.stack(a_members)), dampings)
    g_payload, _ = method.invert_stack(tf.constant(np.stack(g_members)), dampings)
    got = method.solve_kronecker(
        a_payload, g_payload, tf.constant(matrices), tf.constant(DAMPING, tf.float64)
    ).numpy()
    for j in range(groups):
        want = method.solve_kronecker(
            _payload(method, a_members[j], 0.2),
            _payload(method, g_members[j], 0.2),
            tf.constant(matrices[j]),
            tf.constant(DAMPING, tf.float64),
        ).numpy()
        np.testing.assert_allclose(got[j], want, rtol=1e-10)
