"""kfac_dist.linalg against NumPy: packing, damped inverses, π, eigen, KL clip."""

import numpy as np
import pytest
import tensorflow as tf

from kfac_dist import linalg

RNG = np.random.default_rng(0)


def _spd(n: int, scale: float = 1.0) -> np.ndarray:
    x = RNG.normal(size=(2 * n, n))
    return (scale * x.T @ x / (2 * n)).astype(np.float32)


@pytest.fixture(scope="module")
def factor() -> np.ndarray:
    return _spd(5)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_pack_unpack_symmetric_round_trip(n):
    matrix = _spd(n)
    packed = linalg.pack_symmetric(tf.constant(matrix))
    assert packed.shape == (linalg.triangle_size(n),) == (n * (n + 1) // 2,)
    np.testing.assert_array_equal(linalg.unpack_symmetric(packed, n).numpy(), matrix)


def test_pack_symmetric_is_row_major_upper_triangle():
    matrix = np.arange(16, dtype=np.float32).reshape(4, 4)
    matrix = matrix + matrix.T
    packed = linalg.pack_symmetric(tf.constant(matrix)).numpy()
    np.testing.assert_array_equal(packed, matrix[np.triu_indices(4)])
    np.testing.assert_array_equal(packed, [0, 5, 10, 15, 10, 15, 20, 20, 25, 30])


def test_unpack_symmetric_mirrors_the_upper_triangle():
    packed = np.arange(1, 7, dtype=np.float32)
    expected = np.array([[1, 2, 3], [2, 4, 5], [3, 5, 6]], dtype=np.float32)
    np.testing.assert_array_equal(linalg.unpack_symmetric(tf.constant(packed), 3).numpy(), expected)


def test_damped_inverse_of_full_factor_equals_numpy_inverse(factor):
    inverse, retries = linalg.damped_inverse(tf.constant(factor), 0.1)
    expected = np.linalg.inv(factor.astype(np.float64) + 0.1 * np.eye(5))
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert int(retries) == 0


def test_damped_inverse_of_diagonal_factor_is_elementwise():
    diagonal = np.array([0.0, 0.5, 2.0, 10.0], dtype=np.float32)
    inverse, retries = linalg.damped_inverse(tf.constant(diagonal), 0.25)
    np.testing.assert_allclose(inverse.numpy(), 1.0 / (diagonal + 0.25), rtol=1e-6)
    assert int(retries) == 0


def test_damped_inverse_uses_the_symmetric_part():
    matrix = _spd(3)
    skew = np.array([[0, 1, 2], [-1, 0, 3], [-2, -3, 0]], dtype=np.float32) * 0.01
    inverse, _ = linalg.damped_inverse(tf.constant(matrix + skew), 0.5)
    expected = np.linalg.inv(matrix.astype(np.float64) + 0.5 * np.eye(3))
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_damped_inverse_retries_non_positive_definite_factor_with_more_damping():
    rotation, _ = np.linalg.qr(RNG.normal(size=(4, 4)))
    matrix = (rotation @ np.diag([1.0, 2.0, 0.5, -50.0]) @ rotation.T).astype(np.float32)
    damping = 1e-3
    # Cholesky of matrix + damping·I fails (NaN in TF 2.21, no exception).
    assert not np.all(np.isfinite(tf.linalg.cholesky(matrix + damping * np.eye(4))))
    inverse, retries = linalg.damped_inverse(tf.constant(matrix), damping)
    retries = int(retries)
    assert retries > 0
    assert np.all(np.isfinite(inverse.numpy()))
    used = damping * linalg.DAMPING_RETRY_GROWTH**retries
    assert used > 50.0  # the first damping that makes the matrix PD
    assert used / linalg.DAMPING_RETRY_GROWTH < 50.0  # and not one more retry
    expected = np.linalg.inv(matrix.astype(np.float64) + used * np.eye(4))
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-3, atol=1e-6)


def test_damped_inverse_retries_inside_tf_function():
    matrix = np.diag([1.0, -5.0]).astype(np.float32)
    inverse, retries = tf.function(linalg.damped_inverse, autograph=False)(
        tf.constant(matrix), tf.constant(0.01)
    )
    assert int(retries) == 3
    np.testing.assert_allclose(inverse.numpy(), np.diag([1 / 11.0, 1 / 5.0]), rtol=1e-5)


def test_pi_adjustment_is_ratio_of_mean_eigenvalues():
    a, g = _spd(4, 3.0), _spd(3, 0.2)
    pi = linalg.pi_adjustment(tf.constant(a), tf.constant(g)).numpy()
    expected = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
    np.testing.assert_allclose(pi, expected, rtol=1e-5)


def test_pi_adjustment_with_diagonal_factors():
    a = np.array([1.0, 3.0, 8.0], dtype=np.float32)
    g = _spd(2)
    pi = linalg.pi_adjustment(tf.constant(a), tf.constant(g)).numpy()
    np.testing.assert_allclose(pi, np.sqrt(a.mean() / (np.trace(g) / 2)), rtol=1e-5)
    g_diag = np.array([0.5, 0.25, 0.25, 1.0], dtype=np.float32)
    pi = linalg.pi_adjustment(tf.constant(a), tf.constant(g_diag)).numpy()
    np.testing.assert_allclose(pi, np.sqrt(a.mean() / g_diag.mean()), rtol=1e-5)


@pytest.mark.parametrize("zero", ["input", "output", "both"])
def test_pi_adjustment_falls_back_to_one_for_zero_trace(zero):
    a, g = _spd(3), _spd(2)
    if zero in ("input", "both"):
        a = np.zeros_like(a)
    if zero in ("output", "both"):
        g = np.zeros_like(g)
    pi = linalg.pi_adjustment(tf.constant(a), tf.constant(g)).numpy()
    assert pi == 1.0


def test_factored_damping_splits_damping_by_pi():
    a, g = _spd(4, 5.0), _spd(3, 0.1)
    damping = 0.03
    on_a, on_g = linalg.factored_damping(tf.constant(a), tf.constant(g), damping)
    pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
    np.testing.assert_allclose(on_a.numpy(), pi * np.sqrt(damping), rtol=1e-5)
    np.testing.assert_allclose(on_g.numpy(), np.sqrt(damping) / pi, rtol=1e-5)
    np.testing.assert_allclose(on_a.numpy() * on_g.numpy(), damping, rtol=1e-5)


def test_eigendecomposition_reconstructs_factor(factor):
    values, vectors = linalg.eigendecomposition(tf.constant(factor))
    values, vectors = values.numpy(), vectors.numpy()
    np.testing.assert_allclose(vectors @ np.diag(values) @ vectors.T, factor, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(5), atol=1e-5)
    np.testing.assert_allclose(
        np.sort(values), np.linalg.eigvalsh(factor.astype(np.float64)), rtol=1e-4
    )


def test_eigendecomposition_clips_negative_eigenvalues_to_zero():
    matrix = np.diag([2.0, -1e-3, 0.5]).astype(np.float32)
    values, _ = linalg.eigendecomposition(tf.constant(matrix))
    np.testing.assert_allclose(np.sort(values.numpy()), [0.0, 0.5, 2.0])


def test_eigendecomposition_of_diagonal_factor_is_its_values():
    diagonal = np.array([3.0, 0.0, 1.5], dtype=np.float32)
    values, vectors = linalg.eigendecomposition(tf.constant(diagonal))
    np.testing.assert_array_equal(values.numpy(), diagonal)
    assert vectors.shape == (0, 0)


@pytest.mark.parametrize(
    "inner, lr, bound",
    [(4.0, 0.5, 0.01), (-4.0, 0.5, 0.01), (1e-6, 0.1, 1.0), (2.5, 1.0, 2.5)],
)
def test_kl_clip_factor_is_min_one_sqrt_bound_over_lr2_inner(inner, lr, bound):
    factor = linalg.kl_clip_factor(tf.constant(inner), lr, bound).numpy()
    expected = min(1.0, np.sqrt(bound / (lr**2 * abs(inner))))
    np.testing.assert_allclose(factor, expected, rtol=1e-6)


def test_kl_clip_factor_is_one_for_zero_inner_product():
    assert linalg.kl_clip_factor(tf.constant(0.0), 0.1, 0.01).numpy() == 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_damped_inverse_rejects_a_singular_damped_factor_and_retries(dtype):
    # Eigenvalue −1 at damping 1: F + I is singular. Cholesky fails on some
    # rotations and "succeeds" on rounding on others, giving entries of order
    # 1e7; only a well-conditioned attempt may be accepted.
    rng = np.random.default_rng(0)
    for _ in range(20):
        rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
        matrix = (rotation @ np.diag([1.0, 2.0, 0.5, -1.0]) @ rotation.T).astype(dtype)
        inverse, retries = linalg.damped_inverse(tf.constant(matrix), 1.0)
        used = 1.0 * linalg.DAMPING_RETRY_GROWTH ** int(retries)
        damped = matrix.astype(np.float64) + used * np.eye(4)
        assert np.linalg.cond(damped) < 100
        np.testing.assert_allclose(inverse.numpy(), np.linalg.inv(damped), rtol=1e-4, atol=1e-6)


def test_damped_inverse_that_never_becomes_well_conditioned_is_nan():
    # A negative eigenvalue beyond every retry's damping: no attempt accepted.
    matrix = np.diag([1.0, -1e9]).astype(np.float64)
    inverse, retries = linalg.damped_inverse(tf.constant(matrix), 1e-3)
    assert int(retries) == linalg.DAMPING_RETRIES
    assert np.all(np.isnan(inverse.numpy()))


def test_kl_clip_factor_in_float64():
    inner = tf.constant(4.0, tf.float64)
    clip = linalg.kl_clip_factor(inner, tf.constant(0.5, tf.float32), tf.constant(0.01))
    assert clip.dtype == tf.float64
    np.testing.assert_allclose(
        clip.numpy(), np.sqrt(np.float64(np.float32(0.01)) / (0.25 * 4.0)), rtol=1e-12
    )


def test_kl_clip_factor_with_momentum_bounds_the_whole_step():
    # q = (μv − lr·F⁻¹∇)ᵀ F (μv − lr·F⁻¹∇), from an explicit SPD F.
    rng = np.random.default_rng(1)
    root = rng.normal(size=(6, 6))
    fisher = root @ root.T + 0.1 * np.eye(6)
    velocity, grad = rng.normal(size=6), rng.normal(size=6)
    direction = np.linalg.solve(fisher, grad)
    lr, mu, bound = 0.5, 0.9, 0.01
    step = mu * velocity - lr * direction
    clip = linalg.kl_clip_factor(
        tf.constant(direction @ grad, tf.float64),
        lr,
        bound,
        momentum=mu,
        velocity_gradient=velocity @ grad,
        velocity_curvature=velocity @ fisher @ velocity,
    )
    expected = min(1.0, np.sqrt(np.float64(np.float32(bound)) / (step @ fisher @ step)))
    assert expected < 1.0
    np.testing.assert_allclose(clip.numpy(), expected, rtol=1e-6)


def test_pack_unpack_symmetric_work_on_a_stack_of_matrices():
    stack = np.stack([_spd(4), 2.0 * _spd(4), _spd(4, 0.1)])
    packed = linalg.pack_symmetric(tf.constant(stack)).numpy()
    rows, cols = np.triu_indices(4)
    np.testing.assert_array_equal(packed, stack[:, rows, cols])
    np.testing.assert_array_equal(linalg.unpack_symmetric(tf.constant(packed), 4).numpy(), stack)


def test_damped_inverses_of_a_group_retry_each_factor_on_its_own():
    # One batched inversion: a PD factor accepted at once, one that needs
    # more damping, and one no retry makes well-conditioned (NaN).
    healthy = _spd(4).astype(np.float64)
    rotation, _ = np.linalg.qr(RNG.normal(size=(4, 4)))
    indefinite = rotation @ np.diag([1.0, 2.0, 0.5, -50.0]) @ rotation.T
    hopeless = np.diag([1.0, 1.0, 1.0, -1e9])
    dampings = np.array([0.25, 1e-3, 1e-3])
    inverses, retries = linalg.damped_inverses(
        [tf.constant(m) for m in (healthy, indefinite, hopeless)], tf.constant(dampings)
    )
    retries = retries.numpy()
    # 1e-3·10^r must pass 50 (the first PD damping) and not by a whole retry.
    used = 1e-3 * linalg.DAMPING_RETRY_GROWTH ** retries[1]
    assert used > 50.0 > used / linalg.DAMPING_RETRY_GROWTH
    np.testing.assert_array_equal(retries, [0, retries[1], linalg.DAMPING_RETRIES])
    np.testing.assert_allclose(
        inverses[0].numpy(), np.linalg.inv(healthy + 0.25 * np.eye(4)), rtol=1e-10
    )
    np.testing.assert_allclose(
        inverses[1].numpy(), np.linalg.inv(indefinite + used * np.eye(4)), rtol=1e-8, atol=1e-12
    )
    assert np.all(np.isnan(inverses[2].numpy()))


def test_damped_inverses_of_diagonal_factors_take_each_factor_damping():
    diagonals = np.array([[0.0, 0.5, 2.0], [1.0, 3.0, 9.0]], dtype=np.float32)
    inverses, retries = linalg.damped_inverses(
        [tf.constant(d) for d in diagonals], tf.constant([0.25, 0.5])
    )
    np.testing.assert_allclose(inverses[0].numpy(), 1.0 / (diagonals[0] + 0.25), rtol=1e-6)
    np.testing.assert_allclose(inverses[1].numpy(), 1.0 / (diagonals[1] + 0.5), rtol=1e-6)
    np.testing.assert_array_equal(retries.numpy(), [0, 0])


def test_eigendecompositions_of_a_group_match_numpy():
    factors = [_spd(3), _spd(3, 4.0)]
    for (values, vectors), factor in zip(
        linalg.eigendecompositions([tf.constant(f) for f in factors]), factors
    ):
        np.testing.assert_allclose(values.numpy(), np.linalg.eigvalsh(factor), rtol=1e-4)
        rebuilt = vectors.numpy() @ np.diag(values.numpy()) @ vectors.numpy().T
        np.testing.assert_allclose(rebuilt, factor, rtol=1e-4, atol=1e-5)


def test_members_of_grouped_and_ungrouped_factors():
    grouped = tf.zeros([3, 4, 4])
    assert linalg.member_shape((3, 4, 4), 3) == (4, 4)
    assert linalg.member_shape((3, 4), 3) == (4,)
    assert linalg.member_shape((3, 4), None) == (3, 4)
    assert linalg.member_count(None) == 1 and linalg.member_count(3) == 3
    assert tuple(linalg.members(grouped, 3).shape) == (3, 4, 4)
    assert tuple(linalg.members(tf.zeros([4, 4]), None).shape) == (1, 4, 4)
    stack = tf.reshape(tf.range(2 * 3 * 5, dtype=tf.float32), [2, 3, 5])
    flat = linalg.members_of_stack(stack, 3)
    np.testing.assert_array_equal(flat.numpy(), stack.numpy().reshape(6, 5))
    assert linalg.members_of_stack(stack, None) is stack


def test_stack_inverses_and_eigendecompositions_match_the_list_forms():
    factors = [_spd(3), _spd(3, 4.0)]
    dampings = tf.constant([0.5, 0.25])
    stacked, retries = linalg.damped_inverses_of_stack(tf.constant(np.stack(factors)), dampings)
    listed, listed_retries = linalg.damped_inverses([tf.constant(f) for f in factors], dampings)
    np.testing.assert_array_equal(stacked.numpy(), np.stack([t.numpy() for t in listed]))
    np.testing.assert_array_equal(retries.numpy(), listed_retries.numpy())
    values, vectors = linalg.eigendecompositions_of_stack(tf.constant(np.stack(factors)))
    assert tuple(values.shape) == (2, 3) and tuple(vectors.shape) == (2, 3, 3)
    diagonal_values, empty = linalg.eigendecompositions_of_stack(tf.constant([[1.0, -2.0]]))
    np.testing.assert_array_equal(diagonal_values.numpy(), [[1.0, 0.0]])
    assert tuple(empty.shape) == (0, 0)
