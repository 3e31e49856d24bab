"""DenseBlock against NumPy: recorded pre-activations, factors, per-example
statistics, and the damped inverse applied to a gradient in both methods."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import CHOLESKY, DIAGONAL, EIGEN, FULL, KRON, DenseBlock

B, D_IN, D_OUT, C = 5, 4, 3, 2
DAMPING = 0.1


def _dense(use_bias: bool = True, approx: str | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    layer = keras.layers.Dense(D_OUT, activation="tanh", use_bias=use_bias)
    layer.build((None, D_IN))
    layer.kernel.assign(rng.normal(size=(D_IN, D_OUT)).astype(np.float32))
    if use_bias:
        layer.bias.assign(rng.normal(size=(D_OUT,)).astype(np.float32))
    return layer, DenseBlock(layer, approx)


def _with_ones(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def _spd(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n + 3, n))
    return x.T @ x / (n + 3)


# Each case: input shapes of the layer's uses in one forward pass.
CASES = {
    "batch": [(B, D_IN)],
    "sequence": [(B, 3, D_IN)],
    "two_uses": [(B, 2, D_IN), (B, 3, D_IN)],
}


def _recorded(block, layer, shapes, seed=1):
    """Calls the layer once per shape (as capture.py does); random output grads."""
    rng = np.random.default_rng(seed)
    records, inputs, grads = [], [], []
    for shape in shapes:
        x = rng.normal(size=shape).astype(np.float32)
        _, record = block.record(layer.call, tf.constant(x))
        records.append(record)
        inputs.append(x.astype(np.float64))
        grads.append(rng.normal(size=(C, *shape[:-1], D_OUT)))
    output_grads = [tf.constant(g, tf.float32) for g in grads]
    return records, output_grads, inputs, grads


def _per_example_numpy(inputs, grads, use_bias):
    """ĝ[c, i] = Σ_uses Σ_t ā_t g_tᵀ, flattened row-major (kernel rows, bias row)."""
    total = 0.0
    for x, g in zip(inputs, grads, strict=True):
        a = _with_ones(x) if use_bias else x
        a = a.reshape(B, -1, a.shape[-1])
        g = g.reshape(C, B, -1, D_OUT)
        total = total + np.einsum("bti,cbto->cbio", a, g)
    return total.reshape(C * B, -1)


def test_record_keeps_pre_activation_and_returns_activated_output():
    layer, block = _dense()
    x = np.random.default_rng(2).normal(size=(B, D_IN)).astype(np.float32)
    output, record = block.record(layer.call, tf.constant(x))
    s = x @ layer.kernel.numpy() + layer.bias.numpy()
    np.testing.assert_allclose(record.outputs.numpy(), s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(output.numpy(), np.tanh(s), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(record.inputs.numpy(), x)
    assert layer.activation is keras.activations.tanh  # restored


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("use_bias", [True, False])
def test_kron_factors_are_input_and_output_second_moments(case, use_bias):
    layer, block = _dense(use_bias)
    records, output_grads, inputs, grads = _recorded(block, layer, CASES[case])
    a_stat, g_stat = block.statistics(records, output_grads, B)

    rows_a = np.concatenate([x.reshape(-1, D_IN) for x in inputs])
    if use_bias:
        rows_a = _with_ones(rows_a)
    positions = rows_a.shape[0]  # b·T, summed over the layer's uses
    rows_g = np.concatenate([g.reshape(C, -1, D_OUT) for g in grads], axis=1)
    expected_a = rows_a.T @ rows_a / B
    expected_g = sum(rows_g[c].T @ rows_g[c] for c in range(C)) / positions

    assert [tuple(s.shape) for s in (a_stat, g_stat)] == block.factor_shapes()
    assert a_stat.shape == (D_IN + use_bias,) * 2
    np.testing.assert_allclose(a_stat.numpy(), expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-5, atol=1e-6)


def test_sequence_factors_divide_input_by_batch_and_output_by_positions():
    layer, block = _dense()
    rng = np.random.default_rng(3)
    x = rng.normal(size=(B, 3, D_IN)).astype(np.float32)
    g = rng.normal(size=(1, B, 3, D_OUT)).astype(np.float32)
    _, record = block.record(layer.call, tf.constant(x))
    a_stat, g_stat = block.statistics([record], [tf.constant(g)], B)
    a_sum = sum(
        np.outer(_with_ones(x[i, t]), _with_ones(x[i, t])) for i in range(B) for t in range(3)
    )
    g_sum = sum(np.outer(g[0, i, t], g[0, i, t]) for i in range(B) for t in range(3))
    np.testing.assert_allclose(a_stat.numpy(), a_sum / B, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_stat.numpy(), g_sum / (B * 3), rtol=1e-5, atol=1e-6)


def test_numpy_per_example_gradients_match_autodiff_of_the_layer():
    """Anchors the reference below: ĝ[c, i] is the gradient of ⟨g[c, i], s_i⟩."""
    layer, block = _dense(use_bias=True, seed=4)
    _, _, inputs, grads = _recorded(block, layer, CASES["two_uses"])
    expected = _per_example_numpy(inputs, grads, use_bias=True)
    linear = keras.layers.Dense(D_OUT)  # the same weights, no activation
    linear.build((None, D_IN))
    linear.set_weights(layer.get_weights())
    for c in range(C):
        for i in range(B):
            with tf.GradientTape() as tape:
                pseudo = tf.add_n(
                    [
                        tf.reduce_sum(
                            tf.constant(g[c, i], tf.float32) * linear(tf.constant(x[i], tf.float32))
                        )
                        for x, g in zip(inputs, grads, strict=True)
                    ]
                )
            kernel, bias = tape.gradient(pseudo, [linear.kernel, linear.bias])
            flat = np.concatenate([kernel.numpy().ravel(), bias.numpy()])
            np.testing.assert_allclose(flat, expected[c * B + i], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("use_bias", [True, False])
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_diagonal_and_full_statistics_average_per_example_gradients(case, use_bias, approx):
    layer, block = _dense(use_bias, approx)
    records, output_grads, inputs, grads = _recorded(block, layer, CASES[case])
    (stat,) = block.statistics(records, output_grads, B)
    per_example = _per_example_numpy(inputs, grads, use_bias)  # (C·b, n)
    n = (D_IN + use_bias) * D_OUT
    assert per_example.shape == (C * B, n)
    if approx == DIAGONAL:
        expected = np.sum(per_example**2, axis=0) / B
    else:
        expected = sum(np.outer(p, p) for p in per_example) / B
    assert tuple(stat.shape) == block.factor_shapes()[0]
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-4, atol=1e-5)


# --- inverses applied to a gradient ------------------------------------------


@pytest.fixture(scope="module")
def kron_problem():
    rng = np.random.default_rng(7)
    a = _spd(rng, D_IN + 1) * 4.0
    g = _spd(rng, D_OUT) * 0.05
    grad = rng.normal(size=(D_IN + 1, D_OUT))  # [kernel; bias]
    return a, g, grad


def _kron_update(block, factors, grad_matrix, method):
    factors = [tf.constant(f, tf.float32) for f in factors]
    payloads = []
    for index in range(2):
        payload, retries = block.invert(index, factors, DAMPING, method)
        assert int(retries) == 0
        payloads.append(payload)
    shapes = [[tuple(p.shape) for p in payload] for payload in payloads]
    assert shapes == block.payload_shapes(method)
    grads = [
        tf.constant(grad_matrix[:-1], tf.float32),
        tf.constant(grad_matrix[-1], tf.float32),
    ]
    kernel, bias = block.precondition(grads, payloads, DAMPING, method)
    assert kernel.shape == (D_IN, D_OUT) and bias.shape == (D_OUT,)
    return np.concatenate([kernel.numpy(), bias.numpy()[None]], axis=0)


def test_cholesky_precondition_applies_factored_tikhonov_inverses(kron_problem):
    a, g, grad = kron_problem
    _, block = _dense()
    update = _kron_update(block, [a, g], grad, CHOLESKY)
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    root = np.sqrt(DAMPING)
    expected = (
        np.linalg.inv(a + pi * root * np.eye(D_IN + 1))
        @ grad
        @ np.linalg.inv(g + root / pi * np.eye(D_OUT))
    )
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-5)


def test_eigen_precondition_solves_exactly_damped_kronecker_system(kron_problem):
    a, g, grad = kron_problem
    _, block = _dense()
    update = _kron_update(block, [a, g], grad, EIGEN)
    # Row-major vec: vec(A X G) = (A ⊗ G) vec(X) for symmetric G.
    system = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
    expected = np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-5)


def test_kron_statistics_then_eigen_update_matches_numpy_fisher_solve():
    layer, block = _dense()
    records, output_grads, inputs, grads = _recorded(block, layer, CASES["batch"])
    factors = block.statistics(records, output_grads, B)
    grad = np.random.default_rng(8).normal(size=(D_IN + 1, D_OUT))
    update = _kron_update(block, [f.numpy() for f in factors], grad, EIGEN)
    a_bar = _with_ones(inputs[0])
    a = a_bar.T @ a_bar / B
    g = sum(grads[0][c].T @ grads[0][c] for c in range(C)) / B
    system = np.kron(a, g) + DAMPING * np.eye((D_IN + 1) * D_OUT)
    expected = np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)
    np.testing.assert_allclose(update, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
def test_diagonal_and_full_precondition_apply_damped_inverse(approx, method):
    rng = np.random.default_rng(9)
    _, block = _dense(True, approx)
    n = (D_IN + 1) * D_OUT
    factor = rng.uniform(0.1, 2.0, size=n) if approx == DIAGONAL else _spd(rng, n)
    payload, retries = block.invert(0, [tf.constant(factor, tf.float32)], DAMPING, method)
    assert int(retries) == 0
    assert [[tuple(p.shape) for p in payload]] == block.payload_shapes(method)
    grad = rng.normal(size=(D_IN + 1, D_OUT))
    grads = [tf.constant(grad[:-1], tf.float32), tf.constant(grad[-1], tf.float32)]
    kernel, bias = block.precondition(grads, [payload], DAMPING, method)
    matrix = np.diag(factor) if approx == DIAGONAL else factor
    expected = np.linalg.solve(matrix + DAMPING * np.eye(n), grad.reshape(-1))
    update = np.concatenate([kernel.numpy().ravel(), bias.numpy()])
    np.testing.assert_allclose(update, expected, rtol=1e-4, atol=1e-5)


def test_kron_is_the_default_and_approximations_are_validated():
    layer, block = _dense()
    assert block.approx == KRON and block.factor_names() == ["A", "G"]
    with pytest.raises(ValueError, match="fisher_approx"):
        DenseBlock(layer, "bogus")
