"""`max_factor_dim`: factors above the bound kept as diagonal blocks, against NumPy.

Split statistics are the diagonal blocks of the full factors (from a Dense
block's rows, and cut from a whole factor a layer kind returns); the
preconditioned update is NumPy's solve with the explicit Kronecker product of
the block-diagonal factors, damped as the whole factors (Cholesky: π from the
whole traces over the true sides; eigen: exact λ); the zero padding of a side
the blocks do not divide is invisible; a bound above every factor changes
nothing, bit for bit; the full approximation splits its Fisher likewise; the
inversion units count the blocks; a model trains under a small bound.
"""

import keras
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import linalg, strategies
from kfac_dist.blocks import (
    CHOLESKY,
    EIGEN,
    FULL,
    KRON,
    Block,
    DenseBlock,
    EmbeddingBlock,
    Kronecker,
    ScaleShiftBlock,
    factor_dampings,
    invert_factors,
)
from kfac_dist.blocks.records import kron_factors
from kfac_dist.curvature import Curvature, inversion_units
from kfac_dist.placement import make_plan

DAMPING = 0.0625  # float32-exact: hyperparameters are float32
B, C = 5, 2  # examples, output columns of the pseudo-loss


def _dense(fan_in, units, bound, seed=0, use_bias=True):
    rng = np.random.default_rng(seed)
    layer = keras.layers.Dense(units, activation="tanh", use_bias=use_bias)
    layer.build((None, fan_in))
    layer.kernel.assign(rng.normal(size=layer.kernel.shape))
    block = DenseBlock(layer)
    block.max_factor_dim = bound
    return block


def _record(block, seed=0, positions=None):
    """The block's record of a random batch, its NumPy rows ā and output gradients."""
    rng = np.random.default_rng(seed + 1)
    fan_in = block.layer.kernel.shape[0]
    shape = (B, fan_in) if positions is None else (B, positions, fan_in)
    x = rng.normal(size=shape)
    _, record = block.record(block.layer.call, tf.constant(x))
    grads = rng.normal(size=(C, *record.outputs.shape))
    rows = x.reshape(-1, fan_in)
    if block.has_bias:
        rows = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
    return record, tf.constant(grads), rows, grads.reshape(-1, grads.shape[-1])


def numpy_blocks(full, split):
    """The (k, m, m) diagonal blocks of a full (n, n) matrix padded with zeros to k·m."""
    padded = np.zeros((split.padded, split.padded))
    padded[: split.dim, : split.dim] = full
    m = split.size
    return np.stack(
        [padded[i * m : (i + 1) * m, i * m : (i + 1) * m] for i in range(split.members)]
    )


def numpy_block_diagonal(members, dim):
    """The (dim, dim) block-diagonal matrix of (k, m, m) members, padding cut off."""
    return scipy.linalg.block_diag(*members)[:dim, :dim]


def _split_update(a, g, grad, method, a_split, g_split, damping=DAMPING):
    """NumPy's (blockdiag(A_i) ⊗ blockdiag(G_j) + damping)⁻¹ vec(∇), ∇ (n_in, n_out).

    A (or G) full matrices; a side with a split is replaced by its diagonal
    blocks. Cholesky: A + π√λ I, G + √λ/π I with π from the WHOLE factors'
    traces over their true sides; eigen: + λ I exactly.
    """
    a_block = a if a.ndim == 1 else a
    if a_split is not None:
        a_block = numpy_block_diagonal(numpy_blocks(a, a_split), a_split.dim)
    g_block = g if g_split is None else numpy_block_diagonal(numpy_blocks(g, g_split), g_split.dim)
    a_matrix = np.diag(a_block) if a_block.ndim == 1 else a_block
    n_in, n_out = len(a_matrix), len(g_block)
    if method == CHOLESKY:
        trace_a = np.sum(a) if a.ndim == 1 else np.trace(a)
        pi = np.sqrt((trace_a / n_in) / (np.trace(g) / n_out))
        root = np.sqrt(damping)
        system = np.kron(a_matrix + pi * root * np.eye(n_in), g_block + root / pi * np.eye(n_out))
    else:
        system = np.kron(a_matrix, g_block) + damping * np.eye(n_in * n_out)
    return np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)


def _block_update(block, factors, grads, method):
    """The block's update: payloads from `Block.invert`, then `Block.precondition`."""
    payloads = []
    for i in range(len(factors)):
        payload, retries = block.invert(i, factors, DAMPING, method)
        assert int(retries) == 0
        payloads.append(payload)
    update = block.precondition(
        [tf.constant(g) for g in grads], payloads, tf.constant(DAMPING, tf.float64), method
    )
    return [u.numpy() for u in update]


# --- the split itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("dim", "bound", "want"),
    [(10, 4, (3, 4)), (12, 4, (3, 4)), (4609, 1024, (5, 922)), (4609, 2048, (3, 1537))],
)
def test_a_factor_above_the_bound_is_split_into_the_fewest_equal_blocks(dim, bound, want):
    split = linalg.split_of(dim, bound)
    assert (split.members, split.size, split.dim) == (*want, dim)
    assert split.size <= bound and split.padded - dim < split.members
    assert linalg.split_of(dim, dim) is None and linalg.split_of(dim, None) is None


def test_a_split_dense_block_has_grouped_factors_and_damping_rows_covering_every_member():
    block = _dense(6, 5, bound=3)  # A 7×7 → 3 blocks of 3 (padded to 9); G 5×5 → 2 of 3
    assert block.factor_shapes() == [(3, 3, 3), (2, 3, 3)]
    assert block.group_counts() == [3, 2]
    # Members A₀ A₁ A₂ G₀ G₁: every member in a row (G₁ twice, with the same π).
    assert block.damping_rows() == [[0, 3], [1, 4], [2, 4]]
    block.max_factor_dim = 6  # only A
    assert block.factor_shapes() == [(2, 4, 4), (5, 5)]
    assert block.group_counts() == [2, None]
    assert block.damping_rows() == [[0, 2], [1, 2]]


# --- statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("positions", [None, 3], ids=["rank2", "sequence"])
def test_split_statistics_are_the_diagonal_blocks_of_the_full_factors(float64, positions):
    block = _dense(6, 5, bound=3)
    record, grads, rows, grad_rows = _record(block, positions=positions)
    weights = np.random.default_rng(7).uniform(0.5, 2.0, size=B)
    a, g = block.statistics([record], [grads], B, tf.constant(weights))
    row_weights = np.repeat(weights, 1 if positions is None else positions)
    full_a = rows.T @ (rows * row_weights[:, None]) / B
    full_g = grad_rows.T @ grad_rows / len(rows)
    a_split, g_split = block.factor_splits()
    np.testing.assert_allclose(a.numpy(), numpy_blocks(full_a, a_split), rtol=1e-12)
    np.testing.assert_allclose(g.numpy(), numpy_blocks(full_g, g_split), rtol=1e-12)
    # The padded coordinates are zero: they never enter the statistics.
    assert np.all(a.numpy()[-1, -2:] == 0) and np.all(a.numpy()[-1, :, -2:] == 0)


def test_rows_and_a_whole_factor_give_the_same_blocks(float64):
    """The rows path (`kron_factors` with splits) and the generic path (a layer kind that
    returns the whole factor, cut by the Kronecker approximation) agree."""
    block = _dense(6, 5, bound=3)
    record, grads, rows, grad_rows = _record(block)
    splits = block.factor_splits()
    from_rows = kron_factors(tf.constant(rows), tf.constant(grad_rows), B, splits=splits)
    whole = kron_factors(tf.constant(rows), tf.constant(grad_rows), B)

    class WholeFactors(DenseBlock):
        def kron_statistics(self, records, output_grads, batch_size, example_weights=None):
            return whole

    generic = WholeFactors(block.layer)
    generic.max_factor_dim = 3
    cut = generic.statistics([record], [grads], B)
    for r, c in zip(from_rows, cut, strict=True):
        assert c.shape == r.shape
        np.testing.assert_allclose(c.numpy(), r.numpy(), rtol=1e-12)


# --- preconditioning -------------------------------------------------------------------


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize(
    ("fan_in", "units", "bound"),
    [(6, 5, 3), (8, 3, 4), (3, 7, 4), (9, 6, 5)],
    ids=["both_padded", "A_only", "G_only", "both_uneven"],
)
def test_the_split_update_is_numpys_block_diagonal_solve(float64, method, fan_in, units, bound):
    block = _dense(fan_in, units, bound)
    record, grads, rows, grad_rows = _record(block)
    factors = block.statistics([record], [grads], B)
    full_a = rows.T @ rows / B
    full_g = grad_rows.T @ grad_rows / len(rows)
    a_split, g_split = block.factor_splits()
    assert (a_split, g_split) != (None, None)
    rng = np.random.default_rng(3)
    kernel, bias = rng.normal(size=(fan_in, units)), rng.normal(size=units)
    got = _block_update(block, factors, [kernel, bias], method)
    want = _split_update(
        full_a, full_g, np.vstack([kernel, bias]), method, a_split, g_split, DAMPING
    )
    np.testing.assert_allclose(np.vstack([got[0], got[1]]), want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_a_split_output_factor_beside_a_diagonal_input_factor(float64, method):
    """An embedding's diagonal A is never split; its G is."""
    layer = keras.layers.Embedding(6, 5)
    layer.build((None, 3))
    block = EmbeddingBlock(layer)
    block.max_factor_dim = 2
    assert block.factor_splits()[0] is None and block.factor_shapes()[1] == (3, 2, 2)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 6, size=(B, 3))
    _, record = block.record(layer.call, tf.constant(ids))
    grads = rng.normal(size=(C, B, 3, 5))
    factors = block.statistics([record], [tf.constant(grads)], B)
    counts = np.bincount(ids.ravel(), minlength=6) / B
    grad_rows = grads.reshape(-1, 5)
    full_g = grad_rows.T @ grad_rows / ids.size
    np.testing.assert_allclose(factors[0].numpy(), counts, rtol=1e-12)
    grad = rng.normal(size=(6, 5))
    (got,) = _block_update(block, factors, [grad], method)
    want = _split_update(counts, full_g, grad, method, None, block.factor_splits()[1])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_the_padding_is_invisible(float64, method):
    """A 7×7 A in 3 blocks of 3 (two padded coordinates) equals the same blocks unpadded:
    the update of a layer whose A is exactly blockdiag(A₀, A₁, A₂[:1, :1]) kept whole."""
    block = _dense(6, 2, bound=3)
    record, grads, _, _ = _record(block)
    a, g = block.statistics([record], [grads], B)
    assert block.group_counts() == [3, None]
    rng = np.random.default_rng(5)
    kernel, bias = rng.normal(size=(6, 2)), rng.normal(size=2)
    split = _block_update(block, [a, g], [kernel, bias], method)
    whole = _dense(6, 2, bound=None)
    blockdiag = numpy_block_diagonal(a.numpy(), 7)
    unsplit = _block_update(whole, [tf.constant(blockdiag), g], [kernel, bias], method)
    for s, u in zip(split, unsplit, strict=True):
        np.testing.assert_allclose(s, u, rtol=1e-9, atol=1e-13)


def test_members_of_a_split_pair_are_damped_with_the_whole_factors_pi(float64):
    block = _dense(6, 5, bound=3)
    record, grads, rows, grad_rows = _record(block)
    a, g = block.statistics([record], [grads], B)
    means = tf.concat([linalg.mean_eigenvalues(a), linalg.mean_eigenvalues(g)], axis=0)
    dampings = factor_dampings([block], means, DAMPING).numpy()
    pi = np.sqrt((np.trace(rows.T @ rows / B) / 7) / (np.trace(grad_rows.T @ grad_rows) / 5 / B))
    root = np.sqrt(DAMPING)
    np.testing.assert_allclose(dampings, [pi * root] * 3 + [root / pi] * 2, rtol=1e-12)


# --- the full approximation ---------------------------------------------------------------


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_the_full_approximation_splits_its_fisher_into_diagonal_blocks(float64, method):
    layer = keras.layers.LayerNormalization()
    layer.build((None, 4))  # 8 parameters: 3 blocks of 3, one padded coordinate
    block = ScaleShiftBlock(layer, FULL)
    block.max_factor_dim = 3
    assert block.factor_shapes() == [(3, 3, 3)] and block.group_counts() == [3]
    rng = np.random.default_rng(6)
    x = rng.normal(size=(B, 4))
    _, record = block.record(layer.call, tf.constant(x))
    grads = rng.normal(size=(C, B, 4))
    (fisher,) = block.statistics([record], [tf.constant(grads)], B)
    per_example = block.per_example_gradients([record], [tf.constant(grads)]).numpy()
    full = per_example.T @ per_example / B
    split = linalg.split_of(8, 3)
    np.testing.assert_allclose(fisher.numpy(), numpy_blocks(full, split), rtol=1e-12)
    grad = [rng.normal(size=4), rng.normal(size=4)]
    got = np.concatenate(_block_update(block, [fisher], grad, method))
    system = numpy_block_diagonal(numpy_blocks(full, split), 8) + DAMPING * np.eye(8)
    np.testing.assert_allclose(got, np.linalg.solve(system, np.concatenate(grad)), rtol=1e-8)


# --- no split: nothing changes -------------------------------------------------------------


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_a_bound_above_every_factor_changes_nothing_bit_for_bit(float64, method):
    bounded, free = _dense(6, 5, bound=7), _dense(6, 5, bound=None)
    record, grads, _, _ = _record(bounded)
    factors = bounded.statistics([record], [grads], B)
    assert bounded.factor_shapes() == free.factor_shapes() == [(7, 7), (5, 5)]
    for f, w in zip(factors, free.statistics([record], [grads], B), strict=True):
        np.testing.assert_array_equal(f.numpy(), w.numpy())
    grads_ = [np.ones((6, 5)), np.ones(5)]
    for u, w in zip(
        _block_update(bounded, factors, grads_, method),
        _block_update(free, factors, grads_, method),
        strict=True,
    ):
        np.testing.assert_array_equal(u, w)


def _trained(bound, method, steps, seed=0):
    """A small MLP trained by Kfac for `steps` steps: (weights, losses)."""
    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 6))
    y = np.tanh(x @ rng.normal(size=(6, 3))) + 0.1 * rng.normal(size=(64, 3))
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(3)]
    )
    optimizer = kfac.Kfac(
        learning_rate=0.2,
        damping=0.01,
        momentum=0.0,
        invert_every=1,
        inverse_method=method,
        max_factor_dim=bound,
        model=model,
        loss="mse",
        seed=1,
    )
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=steps // 2, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights], history.history["loss"], optimizer


def test_a_model_trains_identically_when_the_bound_is_above_every_factor(float64):
    bounded, bounded_losses, _ = _trained(9, CHOLESKY, steps=4)
    free, free_losses, _ = _trained(None, CHOLESKY, steps=4)
    assert bounded_losses == free_losses
    for b, f in zip(bounded, free, strict=True):
        np.testing.assert_array_equal(b, f)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_a_model_trains_under_a_small_bound_in_float32(method):
    """float32: oneDNN's batched matmul (which crashes on broadcast batch shapes) runs it."""
    _, losses, optimizer = _trained(3, method, steps=16)
    shapes = [block.factor_shapes() for block in optimizer.curvature.blocks]
    assert shapes == [[(3, 3, 3), (3, 3, 3)], [(3, 3, 3), (3, 3)]]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


# --- placement -------------------------------------------------------------------------------


def test_inversion_units_and_the_plan_count_a_split_factors_blocks(float64):
    blocks = [_dense(6, 5, bound=3), _dense(4, 2, bound=3)]
    blocks[1].name = "second"
    units = inversion_units(blocks)
    assert [(u.dim, u.groups) for u in units] == [(3, 3), (3, 2), (3, 2), (2, 1)]
    plan = make_plan(units, 2, "balanced")
    assert plan.costs[0] == 3 * 3**3 and plan.costs[3] == 2**3


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_the_curvature_inverts_a_split_pair_as_the_block_does(float64, method):
    """`Curvature` (its dampings from the members' diagonals) gives `Block.invert`'s payloads."""
    block = _dense(6, 5, bound=3)
    record, grads, _, _ = _record(block)
    factors = block.statistics([record], [grads], B)
    context = strategies.SingleReplicaContext(tf.distribute.get_strategy())
    curvature = Curvature(
        [block], context, inverse_method=method, placement="round_robin", cov_ema_decay=0.0
    )
    curvature.build(
        lambda shape, name, dtype=None: keras.Variable(
            initializer="zeros", shape=shape, dtype=dtype or "float64", trainable=False, name=name
        )
    )
    # Folded once with no decay, the sums over the weights are the factors.
    curvature.fold(curvature.batch_statistics(factors, tf.constant(float(B))), tf.constant(True))
    payloads = curvature.owned_payloads(DAMPING, 0)
    for i, payload in enumerate(payloads):
        want, _ = block.invert(i, factors, DAMPING, method)
        for p, w in zip(payload, want, strict=True):
            np.testing.assert_allclose(p.numpy(), w.numpy(), rtol=1e-12, atol=1e-14)


def test_invert_factors_of_split_members_share_the_batched_op_with_equal_members(float64):
    """A split factor's blocks are grouped members: inverted beside other members of their side."""
    members = np.stack([np.eye(3) * (i + 1) for i in range(3)])
    whole = np.eye(3) * 5.0
    payloads, _ = invert_factors(
        [tf.constant(members), tf.constant(whole)],
        tf.constant([1.0] * 4, tf.float64),
        CHOLESKY,
        [3, None],
    )
    np.testing.assert_allclose(payloads[0][0].numpy()[2], np.eye(3) / 4.0)
    np.testing.assert_allclose(payloads[1][0].numpy(), np.eye(3) / 6.0)


def test_kronecker_approximation_without_a_bound_on_a_stub_splits_nothing():
    class Stub(Block):
        def kron_dims(self):
            return (9, 9), 9

    stub = Stub("stub", [], KRON)
    assert Kronecker().factor_splits(stub) == [None, None]
    stub.max_factor_dim = 4
    assert Kronecker().factor_shapes(stub) == [(3, 3, 3), (3, 3, 3)]


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize("units", [50, 30], ids=["both_split", "A_split"])
def test_the_split_update_in_float32_matches_float64(method, units):
    """Eager float32 goes through oneDNN's batched matmul (it crashed on broadcast batch
    shapes): the update agrees with the float64 one."""
    updates = []
    for dtype in ("float32", "float64"):
        previous = keras.config.floatx()
        keras.config.set_floatx(dtype)
        try:
            block = _dense(99, units, bound=40)  # A 100 → 3 blocks of 34, G 50 → 2 of 25
            record, grads, _, _ = _record(block)
            factors = block.statistics([record], [tf.cast(grads, dtype)], B)
            payloads = [block.invert(i, factors, DAMPING, method)[0] for i in range(2)]
            rng = np.random.default_rng(8)
            grad = [tf.constant(rng.normal(size=s), dtype) for s in [(99, units), (units,)]]
            damping = tf.constant(DAMPING, dtype)
            updates.append([u.numpy() for u in block.precondition(grad, payloads, damping, method)])
        finally:
            keras.config.set_floatx(previous)
    for low, high in zip(*updates, strict=True):
        np.testing.assert_allclose(low, high, rtol=2e-3, atol=2e-3 * np.abs(high).max())
