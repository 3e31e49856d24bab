"""The approximations against NumPy, on a stub layer kind: factors, statistics, damping
split and preconditioning (explicit Kronecker products and inverses) in both inverse methods."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import (
    APPROXIMATION_OF,
    APPROXIMATIONS,
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    KRON,
    Approximation,
    Block,
    Cholesky,
    Diagonal,
    Eigen,
    Full,
    Kronecker,
    KronPart,
    factor_dampings,
    invert_factors,
)

RNG = np.random.default_rng(0)
DAMPING = 0.25  # float32-exact: hyperparameters are float32
D_IN, D_OUT, B, C = 3, 2, 4, 2  # a (3, 2) kernel and a (2,) bias: A is 4×4, G 2×2
N = (D_IN + 1) * D_OUT
METHODS = [Cholesky(), Eigen()]


def _spd(n: int, scale: float = 1.0) -> np.ndarray:
    x = RNG.normal(size=(2 * n, n))
    return scale * x.T @ x / (2 * n)


class StubLayer:
    """A layer kind as Dense maps [kernel; bias], with given factors and per-example gradients."""

    num_params = N

    def __init__(self, kron=None, per_example=None, diagonal_input=False):
        self.kron, self.per_example, self.diagonal_input = kron, per_example, diagonal_input
        self.calls = []

    def kron_dims(self):
        fan_in = D_IN + 1
        return ((fan_in,) if self.diagonal_input else (fan_in, fan_in)), D_OUT

    def kron_statistics(self, records, output_grads, batch_size, example_weights=None):
        self.calls.append((records, output_grads, batch_size, example_weights))
        return [tf.constant(f, tf.float64) for f in self.kron]

    def gradient_matrix(self, grads):
        return tf.concat([grads[0], grads[1][tf.newaxis]], axis=0)

    def split_matrix(self, matrix):
        return [matrix[:-1], matrix[-1]]

    def per_example_gradients(self, records, output_grads):
        self.calls.append((records, output_grads))
        return tf.constant(self.per_example, tf.float64)


def _grads():
    grad = RNG.normal(size=(D_IN + 1, D_OUT))
    return grad, [tf.constant(grad[:-1]), tf.constant(grad[-1])]


def _payloads(approximation, layer, factors, method):
    """Each factor's payload, damped as `factor_dampings` spreads λ over them."""
    block = Block("stub", [], approximation.name)
    assert type(block.approximation) is type(approximation)
    means = tf.constant([np.mean(np.diag(f) if f.ndim == 2 else f) for f in factors])
    dampings = factor_dampings([block], means, DAMPING)
    payloads, retries = invert_factors([tf.constant(f) for f in factors], dampings, method)
    assert [int(r) for r in retries] == [0] * len(factors)
    shapes = [method.payload_shapes(s) for s in approximation.factor_shapes(layer)]
    assert [[tuple(p.shape) for p in payload] for payload in payloads] == shapes
    return payloads


def test_registry_maps_each_fisher_approx_option_to_its_class_kron_first():
    assert tuple(APPROXIMATION_OF) == APPROXIMATIONS
    assert APPROXIMATION_OF[KRON] is Kronecker
    assert APPROXIMATION_OF["diagonal"] is Diagonal
    assert APPROXIMATION_OF[FULL] is Full
    assert all(issubclass(cls, Approximation) for cls in APPROXIMATION_OF.values())
    assert Block.approximations == (KRON, DIAGONAL, FULL)
    assert Block("b", []).approx == KRON


def test_a_block_delegates_to_its_approximation_and_inverse_method():
    variables = [keras.Variable(np.zeros((D_IN, D_OUT))), keras.Variable(np.zeros(D_OUT))]
    block = Block("b", variables, FULL)
    assert isinstance(block.approximation, Full) and block.num_params == N
    assert block.factor_names() == ["full"] and block.factor_shapes() == [(N, N)]
    assert block.payload_shapes(EIGEN) == [[(N,), (N, N)]]
    assert block.payload_shapes(Cholesky()) == [[(N, N)]]
    assert Block("d", variables, DIAGONAL).payload_shapes(EIGEN) == [[(N,), (0, 0)]]


def test_kronecker_factors_names_and_weights():
    layer = StubLayer()
    assert Kronecker().factor_names() == ["A", "G"]
    assert Kronecker().factor_shapes(layer) == [(D_IN + 1, D_IN + 1), (D_OUT, D_OUT)]
    assert Kronecker().factor_shapes(StubLayer(diagonal_input=True)) == [(D_IN + 1,), (2, 2)]
    assert Kronecker().weighted_factors() == [True, False]
    assert Diagonal().weighted_factors() == [False] and Full().weighted_factors() == [False]


def test_kronecker_statistics_are_the_layer_kinds_kronecker_statistics():
    a, g = _spd(D_IN + 1), _spd(D_OUT)
    layer = StubLayer(kron=[a, g])
    weights = tf.constant([1.0, 2.0, 0.0, 1.0])
    got = Kronecker().statistics(layer, ["record"], ["grads"], B, weights)
    np.testing.assert_array_equal(got[0].numpy(), a)
    np.testing.assert_array_equal(got[1].numpy(), g)
    assert layer.calls == [(["record"], ["grads"], B, weights)]


def test_kronecker_damping_is_split_by_pi_for_each_block_at_once():
    # Three blocks' (tr A/dim A, tr G/dim G); the last G is zero: π falls back to 1.
    means = np.array([[2.0, 0.5], [1.0, 4.0], [3.0, 0.0]])
    got = Kronecker().factor_dampings(tf.constant(means), DAMPING).numpy()
    root = np.sqrt(DAMPING)
    pi = np.array([2.0, 0.5, 1.0])
    np.testing.assert_allclose(got, np.stack([pi * root, root / pi], axis=1), rtol=1e-12)


@pytest.mark.parametrize("approximation", [Diagonal(), Full()], ids=["diagonal", "full"])
def test_diagonal_and_full_damping_is_lambda(approximation):
    got = approximation.factor_dampings(tf.constant([[5.0], [0.1]], tf.float64), DAMPING)
    np.testing.assert_allclose(got.numpy(), [[DAMPING], [DAMPING]], rtol=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=[CHOLESKY, EIGEN])
@pytest.mark.parametrize("diagonal_input", [False, True], ids=["full_a", "diagonal_a"])
def test_kronecker_precondition_matches_numpy(method, diagonal_input):
    a = RNG.uniform(0.2, 3.0, size=D_IN + 1) if diagonal_input else _spd(D_IN + 1, 4.0)
    g = _spd(D_OUT, 0.05)
    layer = StubLayer(diagonal_input=diagonal_input)
    approximation = Kronecker()
    payloads = _payloads(approximation, layer, [a, g], method)
    grad, grads = _grads()
    kernel, bias = approximation.precondition(
        layer, grads, payloads, tf.constant(DAMPING, tf.float64), method
    )
    update = np.concatenate([kernel.numpy(), bias.numpy()[None]], axis=0)
    dense_a = np.diag(a) if diagonal_input else a
    if method.name == CHOLESKY:
        pi = np.sqrt(np.mean(np.diag(dense_a)) / np.mean(np.diag(g)))
        root = np.sqrt(DAMPING)
        a_damped = dense_a + pi * root * np.eye(D_IN + 1)
        g_damped = g + root / pi * np.eye(D_OUT)
        expected = np.linalg.solve(np.kron(a_damped, g_damped), grad.reshape(-1))
    else:
        system = np.kron(dense_a, g) + DAMPING * np.eye(N)
        expected = np.linalg.solve(system, grad.reshape(-1))
    np.testing.assert_allclose(update.reshape(-1), expected, rtol=1e-9)


@pytest.mark.parametrize("approximation", [Diagonal(), Full()], ids=["diagonal", "full"])
def test_per_example_statistics_are_second_moments_over_the_batch(approximation):
    per_example = RNG.normal(size=(C * B, N))
    layer = StubLayer(per_example=per_example)
    assert approximation.factor_shapes(layer) == (
        [(N,)] if approximation.name == DIAGONAL else [(N, N)]
    )
    (stat,) = approximation.statistics(layer, ["record"], ["grads"], B)
    assert layer.calls == [(["record"], ["grads"])]
    full = per_example.T @ per_example / B
    expected = np.diag(full) if approximation.name == DIAGONAL else full
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=[CHOLESKY, EIGEN])
@pytest.mark.parametrize("approximation", [Diagonal(), Full()], ids=["diagonal", "full"])
def test_per_example_precondition_matches_numpy(approximation, method):
    diagonal = approximation.name == DIAGONAL
    factor = RNG.uniform(0.0, 2.0, size=N) if diagonal else _spd(N)
    payloads = _payloads(approximation, StubLayer(), [factor], method)
    grad, grads = _grads()
    kernel, bias = approximation.precondition(
        StubLayer(), grads, payloads, tf.constant(DAMPING, tf.float64), method
    )
    assert kernel.shape == (D_IN, D_OUT) and bias.shape == (D_OUT,)
    matrix = np.diag(factor) if diagonal else factor
    # The flat vector is the variables in order, each row-major: [kernel; bias] row-major.
    expected = np.linalg.solve(matrix + DAMPING * np.eye(N), grad.reshape(-1))
    update = np.concatenate([kernel.numpy().ravel(), bias.numpy()])
    np.testing.assert_allclose(update, expected, rtol=1e-9)


def test_factor_dampings_of_mixed_approximations_keep_factor_order():
    kinds = [KRON, FULL, KRON, DIAGONAL]
    blocks = [Block(f"b{i}", [], approx) for i, approx in enumerate(kinds)]
    # b0/A, b0/G; b1; b2/A, b2/G; b3. Grouped by approximation, then put back in order.
    means = np.array([2.0, 0.5, 9.0, 1.0, 4.0, 7.0])
    got = factor_dampings(blocks, tf.constant(means), DAMPING).numpy()
    root = np.sqrt(DAMPING)
    expected = [2 * root, root / 2, DAMPING, root / 2, 2 * root, DAMPING]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


class PartsLayer:
    """A layer kind with a grouped pair (2 members: A 2×2, G 2×2) and a diagonal-A pair."""

    def kron_parts(self):
        return [KronPart("dw", (2, 2), 2, 2), KronPart("pw", (3,), 2)]

    def gradient_matrices(self, grads):
        return [grads[0], grads[1]]

    def split_matrices(self, matrices):
        return list(matrices)


def test_kronecker_parts_give_names_shapes_groups_and_damping_rows():
    layer, approximation = PartsLayer(), Kronecker()
    assert approximation.factor_names(layer) == ["dw_A", "dw_G", "pw_A", "pw_G"]
    assert approximation.factor_shapes(layer) == [(2, 2, 2), (2, 2, 2), (3,), (2, 2)]
    assert approximation.group_counts(layer) == [2, 2, None, None]
    assert approximation.weighted_factors(layer) == [True, False, True, False]
    # Members: dw_A₀, dw_A₁, dw_G₀, dw_G₁, pw_A, pw_G.
    assert approximation.damping_rows(layer) == [[0, 2], [1, 3], [4, 5]]
    assert approximation.group_counts(StubLayer()) == [None, None]
    assert approximation.damping_rows(StubLayer()) == [[0, 1]]


@pytest.mark.parametrize("method", METHODS, ids=[CHOLESKY, EIGEN])
def test_kronecker_parts_precondition_each_member_pair_with_its_own_factors(method):
    layer, approximation = PartsLayer(), Kronecker()
    a_dw, g_dw = np.stack([_spd(2), _spd(2, 3.0)]), np.stack([_spd(2), _spd(2, 0.5)])
    a_pw, g_pw = RNG.uniform(0.2, 2.0, size=3), _spd(2)
    factors = [a_dw, g_dw, a_pw, g_pw]
    dampings = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])  # per member, in member order
    payloads, _ = invert_factors(
        [tf.constant(f) for f in factors], tf.constant(dampings), method, [2, 2, None, None]
    )
    grads = [RNG.normal(size=(2, 2, 2)), RNG.normal(size=(3, 2))]
    got = approximation.precondition(
        layer, [tf.constant(g) for g in grads], payloads, tf.constant(DAMPING, tf.float64), method
    )
    pairs = [(a_dw[0], g_dw[0], 0.1, 0.3), (a_dw[1], g_dw[1], 0.2, 0.4)]
    pairs.append((np.diag(a_pw), g_pw, 0.5, 0.6))
    matrices = [grads[0][0], grads[0][1], grads[1]]
    results = [got[0].numpy()[0], got[0].numpy()[1], got[1].numpy()]
    for (a, g, d_a, d_g), matrix, result in zip(pairs, matrices, results, strict=True):
        if method.name == CHOLESKY:
            want = np.linalg.inv(a + d_a * np.eye(len(a))) @ matrix
            want = want @ np.linalg.inv(g + d_g * np.eye(len(g)))
        else:
            system = np.kron(a, g) + DAMPING * np.eye(a.size // len(a) * len(g))
            want = np.linalg.solve(system, matrix.reshape(-1)).reshape(matrix.shape)
        np.testing.assert_allclose(result, want, rtol=1e-9)
