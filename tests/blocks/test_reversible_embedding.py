"""ReversibleEmbeddingBlock against NumPy: both uses of a tied table pooled into one
Kronecker pair (vocabulary side diagonal or full), the untied layer's two pairs, the
preconditioned update in both inverse methods, and K-FAC steps on models of the layer."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import capture, registration
from kfac_dist.blocks import (
    CHOLESKY,
    EIGEN,
    DenseBlock,
    EmbeddingBlock,
    ReversibleEmbeddingBlock,
)
from kfac_dist.blocks import reversible_embedding as reversible

B, T, T_REV, VOCAB, WIDTH, C = 4, 3, 2, 7, 3, 2
DAMPING = 0.2


def _layer(tie_weights: bool = True, seed: int = 0, **kwargs) -> keras.layers.Layer:
    rng = np.random.default_rng(seed)
    layer = keras.layers.ReversibleEmbedding(VOCAB, WIDTH, tie_weights=tie_weights, **kwargs)
    layer.build((None, T))
    layer.embeddings.assign(rng.normal(size=(VOCAB, WIDTH)))
    if not tie_weights:
        layer.reverse_embeddings.assign(rng.normal(size=(WIDTH, VOCAB)))
    return layer


def _recorded(block, seed: int = 1):
    """One embedding use on ids (B, T), one reverse use on h (B, T_REV, WIDTH)."""
    rng = np.random.default_rng(seed)
    # Token 6 never occurs, token 2 often.
    ids = np.array([[2, 0, 2], [1, 2, 5], [3, 3, 2], [4, 0, 1]], dtype=np.int32)
    h = rng.normal(size=(B, T_REV, WIDTH))
    layer = block.layer
    embedded, first = block.record(layer.call, tf.constant(ids))
    logits, second = block.record(layer.call, tf.constant(h, layer.compute_dtype), reverse=True)
    g_emb = rng.normal(size=(C, B, T, WIDTH))
    g_rev = rng.normal(size=(C, B, T_REV, VOCAB))
    grads = [tf.constant(g_emb, layer.compute_dtype), tf.constant(g_rev, layer.compute_dtype)]
    return [first, second], grads, ids, h, g_emb, g_rev, embedded, logits


def _gram(grads: np.ndarray) -> np.ndarray:
    """Σ over columns and rows of g gᵀ, for (C, ..., n) gradients."""
    rows = grads.reshape(-1, grads.shape[-1])
    return rows.T @ rows


def _pooled(ids, h, g_emb, g_rev, full: bool):
    """The NumPy pair: U = (diag(counts) + Σ_rev g gᵀ)/b, W = (Σ_emb g gᵀ + Σ h hᵀ)/N."""
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    vocab = np.diag(counts) + _gram(g_rev)
    hidden = _gram(g_emb) + _gram(h)
    positions = ids.size + h.shape[0] * h.shape[1]
    return (vocab if full else np.diag(vocab)) / B, hidden / positions


def test_record_tells_the_uses_apart_and_returns_the_layers_outputs(float64):
    block = ReversibleEmbeddingBlock(_layer())
    records, _, ids, h, _, _, embedded, logits = _recorded(block)
    table = block.layer.embeddings.numpy()
    assert [r.reverse for r in records] == [False, True]
    np.testing.assert_allclose(embedded.numpy(), table[ids])
    np.testing.assert_allclose(logits.numpy(), h @ table.T)
    np.testing.assert_array_equal(records[0].inputs.numpy(), ids)
    np.testing.assert_allclose(records[1].outputs.numpy(), h @ table.T)


def test_soft_cap_is_applied_after_the_recorded_logits(float64):
    layer = _layer(logit_soft_cap=0.5)
    block = ReversibleEmbeddingBlock(layer)
    h = np.random.default_rng(3).normal(size=(B, T_REV, WIDTH))
    logits, record = block.record(layer.call, tf.constant(h), reverse=True)
    s = h @ layer.embeddings.numpy().T
    np.testing.assert_allclose(record.outputs.numpy(), s)
    np.testing.assert_allclose(logits.numpy(), 0.5 * np.tanh(s / 0.5))
    np.testing.assert_allclose(logits.numpy(), layer(tf.constant(h), reverse=True).numpy())
    assert layer.logit_soft_cap == 0.5


@pytest.mark.parametrize("vocab_factor", ["full", "diagonal"])
def test_tied_factors_pool_the_rows_of_both_uses(float64, vocab_factor):
    block = ReversibleEmbeddingBlock(_layer(), vocab_factor=vocab_factor)
    records, grads, ids, h, g_emb, g_rev, _, _ = _recorded(block)
    u, w = block.statistics(records, grads, B)
    full = vocab_factor == "full"
    expected_u, expected_w = _pooled(ids, h, g_emb, g_rev, full)
    assert block.factor_shapes() == [(VOCAB, VOCAB) if full else (VOCAB,), (WIDTH, WIDTH)]
    assert [tuple(u.shape), tuple(w.shape)] == block.factor_shapes()
    np.testing.assert_allclose(u.numpy(), expected_u, rtol=1e-12)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-12)


def test_sample_weights_weight_the_counts_and_the_reverse_hidden_states(float64):
    """The logits' gradients carry the weights already (the pseudo-loss); the counts and
    the reverse use's hidden states take them here, as a Dense block's inputs do."""
    block = ReversibleEmbeddingBlock(_layer(), vocab_factor="full")
    records, grads, ids, h, g_emb, g_rev, _, _ = _recorded(block)
    weights = np.array([0.5, 2.0, 0.0, 1.5])
    u, w = block.statistics(records, grads, B, tf.constant(weights))
    counts = np.zeros(VOCAB)
    np.add.at(counts, ids.ravel(), np.repeat(weights, T))
    weighted_h = (h * weights[:, None, None]).reshape(-1, WIDTH)
    expected_u = (np.diag(counts) + _gram(g_rev)) / B
    expected_w = (_gram(g_emb) + h.reshape(-1, WIDTH).T @ weighted_h) / (ids.size + h.size // WIDTH)
    np.testing.assert_allclose(u.numpy(), expected_u, rtol=1e-12)
    np.testing.assert_allclose(w.numpy(), expected_w, rtol=1e-12)
    assert block.weighted_factors() == [True, False]


def test_small_vocabularies_get_a_full_side_and_large_ones_a_diagonal(float64):
    assert ReversibleEmbeddingBlock(_layer()).vocab_factor == "full"
    large = keras.layers.ReversibleEmbedding(reversible.FULL_VOCABULARY_MAX + 1, 2)
    large.build((None, 1))
    assert ReversibleEmbeddingBlock(large).factor_shapes() == [
        (reversible.FULL_VOCABULARY_MAX + 1,),
        (2, 2),
    ]
    with pytest.raises(ValueError, match="vocab_factor"):
        ReversibleEmbeddingBlock(large, vocab_factor="low_rank")


def test_one_use_alone_is_the_embedding_or_the_dense_blocks_pair(float64):
    """Embedding use only: EmbeddingBlock's pair. Reverse use only: DenseBlock's pair for
    the kernel Eᵀ, transposed (U ⊗ W = G_dense ⊗ A_dense on vec(E))."""
    block = ReversibleEmbeddingBlock(_layer(), vocab_factor="diagonal")
    records, grads, ids, h, _, _, _, _ = _recorded(block)
    u, w = block.statistics(records[:1], grads[:1], B)
    a, g = EmbeddingBlock(block.layer).statistics(records[:1], grads[:1], B)
    np.testing.assert_allclose(u.numpy(), a.numpy(), rtol=1e-12)
    np.testing.assert_allclose(w.numpy(), g.numpy(), rtol=1e-12)

    dense = keras.layers.Dense(VOCAB, use_bias=False)
    dense.build((None, WIDTH))
    dense.kernel.assign(block.layer.embeddings.numpy().T)
    dense_block = DenseBlock(dense)
    _, dense_record = dense_block.record(dense.call, tf.constant(h))
    np.testing.assert_allclose(dense_record.outputs.numpy(), records[1].outputs.numpy())
    a_dense, g_dense = dense_block.statistics([dense_record], grads[1:], B)
    full = ReversibleEmbeddingBlock(block.layer, vocab_factor="full")
    u, w = full.statistics(records[1:], grads[1:], B)
    np.testing.assert_allclose(
        np.kron(u.numpy(), w.numpy()),
        _commute(VOCAB, WIDTH)
        @ np.kron(a_dense.numpy(), g_dense.numpy())
        @ _commute(VOCAB, WIDTH).T,
        rtol=1e-10,
        atol=1e-12,
    )


def _commute(rows: int, cols: int) -> np.ndarray:
    """K with K vec_rowmajor(Mᵀ) = vec_rowmajor(M) for M of shape (rows, cols)."""
    k = np.zeros((rows * cols, rows * cols))
    for i in range(rows):
        for j in range(cols):
            k[i * cols + j, j * rows + i] = 1.0
    return k


@pytest.mark.parametrize("vocab_factor", ["full", "diagonal"])
@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_tied_precondition_solves_the_damped_pair(float64, vocab_factor, method):
    block = ReversibleEmbeddingBlock(_layer(), vocab_factor=vocab_factor)
    records, grads, ids, h, g_emb, g_rev, _, _ = _recorded(block)
    factors = block.statistics(records, grads, B)
    payloads = []
    for index in range(2):
        payload, retries = block.invert(index, factors, DAMPING, method)
        assert int(retries) == 0
        payloads.append(payload)
    assert [[tuple(p.shape) for p in pl] for pl in payloads] == block.payload_shapes(method)
    grad = np.random.default_rng(2).normal(size=(VOCAB, WIDTH))
    (update,) = block.precondition([tf.constant(grad)], payloads, DAMPING, method)
    u, w = _pooled(ids, h, g_emb, g_rev, full=True)
    if vocab_factor == "diagonal":
        u = np.diag(np.diag(u))
    expected = _solve(u, w, grad, method)
    np.testing.assert_allclose(update.numpy(), expected, rtol=1e-6, atol=1e-10)


def _solve(u: np.ndarray, w: np.ndarray, grad: np.ndarray, method: str) -> np.ndarray:
    """Cholesky: factored Tikhonov (π√λ on U, √λ/π on W); eigen: (U ⊗ W + λI)⁻¹ exactly."""
    n, m = u.shape[0], w.shape[0]
    if method == CHOLESKY:
        pi = np.sqrt((np.trace(u) / n) / (np.trace(w) / m))
        root = np.sqrt(DAMPING)
        return (
            np.linalg.inv(u + pi * root * np.eye(n))
            @ grad
            @ np.linalg.inv(w + root / pi * np.eye(m))
        )
    system = np.kron(u, w) + DAMPING * np.eye(n * m)
    return np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)


def test_untied_layer_has_one_pair_per_variable(float64):
    layer = _layer(tie_weights=False)
    block = ReversibleEmbeddingBlock(layer, vocab_factor="full")
    assert [v.path for v in block.variables] == [
        layer.embeddings.path,
        layer.reverse_embeddings.path,
    ]
    assert block.factor_names() == ["embedding_A", "embedding_G", "reverse_A", "reverse_G"]
    records, grads, ids, h, g_emb, g_rev, _, logits = _recorded(block)
    np.testing.assert_allclose(logits.numpy(), h @ layer.reverse_embeddings.numpy())
    factors = [f.numpy() for f in block.statistics(records, grads, B)]
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    expected = [
        np.diag(counts) / B,
        _gram(g_emb) / ids.size,
        _gram(g_rev) / B,
        _gram(h) / (B * T_REV),
    ]
    assert [f.shape for f in factors] == [tuple(s) for s in block.factor_shapes()]
    for got, want in zip(factors, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    # Each variable is preconditioned by its own pair, R as its transpose (V, H).
    rng = np.random.default_rng(4)
    grad_e, grad_r = rng.normal(size=(VOCAB, WIDTH)), rng.normal(size=(WIDTH, VOCAB))
    payloads = [
        block.invert(i, block.statistics(records, grads, B), DAMPING, EIGEN)[0] for i in range(4)
    ]
    update_e, update_r = block.precondition(
        [tf.constant(grad_e), tf.constant(grad_r)], payloads, DAMPING, EIGEN
    )
    np.testing.assert_allclose(
        update_e.numpy(), _solve(expected[0], expected[1], grad_e, EIGEN), rtol=1e-6
    )
    np.testing.assert_allclose(
        update_r.numpy(), _solve(expected[2], expected[3], grad_r.T, EIGEN).T, rtol=1e-6
    )


# --- registration and K-FAC steps ----------------------------------------------------


def _tied_model() -> tuple[keras.Model, keras.layers.Layer]:
    """Token ids → E[ids] → E[ids] Eᵀ: only the tied table is trained, used both ways."""
    tokens = keras.Input((T,), dtype="int32")
    table = keras.layers.ReversibleEmbedding(VOCAB, WIDTH, name="table")
    logits = table(table(tokens), reverse=True)
    return keras.Model(tokens, logits), table


def test_registration_gives_the_layer_its_block_and_records_both_calls(float64):
    keras.utils.set_random_seed(0)
    model, table = _tied_model()
    (block,) = registration.collect_blocks(model)
    assert isinstance(block, ReversibleEmbeddingBlock) and block.layer is table
    ids = np.zeros((B, T), np.int32)
    with capture.recording([block]) as records:
        model(ids)
    assert [r.reverse for r in records[0]] == [False, True]
    untied = keras.layers.ReversibleEmbedding(VOCAB, WIDTH, tie_weights=False)
    tokens = keras.Input((T,), dtype="int32")
    (block,) = registration.collect_blocks(
        keras.Model(tokens, untied(untied(tokens), reverse=True))
    )
    assert len(block.variables) == 2 and not block.tied


def _step_kfac(model: keras.Model, **overrides) -> kfac.Kfac:
    arguments = dict(
        learning_rate=1.0,
        damping=1e-10,
        momentum=0.0,
        model=model,
        loss="mse",
        estimation_mode="exact",
        inverse_method="eigen",
        cov_ema_decay=0.0,
        invert_every=1,
    )
    arguments.update(overrides)
    optimizer = kfac.Kfac(**arguments)
    model.compile(optimizer=optimizer, loss=arguments["loss"])
    return optimizer


def test_both_uses_enter_the_factors_of_one_step_in_closed_form(float64):
    """logits = E[ids] Eᵀ under MSE, exact Fisher: per row, Σ_c g gᵀ at the logits is
    (2/(T·V)) I, and at the embedding Eᵀ (2/(T·V)) E, so that
    U = diag(counts)/b + (2/V) I and W = ((2b/V) EᵀE + Eᵀ diag(counts) E)/(2bT);
    the step is −(U ⊗ W + λI)⁻¹ ∇. The embedding use alone would give
    diag(counts)/b and (2/(T·V)) EᵀE: another step."""
    keras.utils.set_random_seed(0)
    model, table = _tied_model()
    rng = np.random.default_rng(7)
    ids = rng.integers(0, VOCAB, size=(B, T)).astype(np.int32)
    y = rng.normal(size=(B, T, VOCAB))
    e = table.embeddings.numpy().copy()
    damping = 0.0625  # exact in float32, as the damping is read
    optimizer = _step_kfac(model, damping=damping)
    model.fit(ids, y, batch_size=B, epochs=1, verbose=0, shuffle=False)

    counts = np.bincount(ids.ravel(), minlength=VOCAB).astype(float)
    u = np.diag(counts) / B + 2 / VOCAB * np.eye(VOCAB)
    w = (2 * B / VOCAB * e.T @ e + e.T @ np.diag(counts) @ e) / (2 * B * T)
    got_u, got_w = (f.numpy() for f in optimizer.curvature.factors())
    np.testing.assert_allclose(got_u, u, rtol=1e-10)
    np.testing.assert_allclose(got_w, w, rtol=1e-10)
    assert not np.allclose(got_w, 2 / (T * VOCAB) * e.T @ e, rtol=1e-2)

    x = e[ids]  # (B, T, H)
    residual = 2 * (x @ e.T - y) / y.size  # ∂L/∂logits
    grad = np.einsum("btv,bth->vh", residual, x)  # the reverse use
    np.add.at(grad, ids.ravel(), (residual @ e).reshape(-1, WIDTH))  # the embedding use
    step = np.linalg.solve(np.kron(u, w) + damping * np.eye(VOCAB * WIDTH), grad.reshape(-1))
    np.testing.assert_allclose(table.embeddings.numpy(), e - step.reshape(e.shape), rtol=1e-8)


def test_one_step_on_the_reverse_use_alone_reaches_least_squares(float64):
    """h → h Eᵀ under MSE with per-position targets: the tied pair is exact."""
    rng = np.random.default_rng(8)
    keras.utils.set_random_seed(0)
    hidden = keras.Input((T_REV, WIDTH))
    layer = keras.layers.ReversibleEmbedding(VOCAB, WIDTH)
    model = keras.Model(hidden, layer(hidden, reverse=True))
    h = rng.normal(size=(16, T_REV, WIDTH))
    y = rng.normal(size=(16, T_REV, VOCAB))
    _step_kfac(model)
    model.fit(h, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    solution = np.linalg.lstsq(h.reshape(-1, WIDTH), y.reshape(-1, VOCAB), rcond=None)[0]
    np.testing.assert_allclose(layer.embeddings.numpy().T, solution, rtol=1e-6, atol=1e-8)


def test_one_step_on_both_untied_uses_reaches_least_squares(float64):
    """ids → E[ids] and h → h R, each under MSE: each variable's pair is exact for its
    use (E: the mean target of each token; R: least squares over every position)."""
    rng = np.random.default_rng(9)
    keras.utils.set_random_seed(0)
    tokens, hidden = keras.Input((T,), dtype="int32"), keras.Input((T_REV, WIDTH))
    layer = keras.layers.ReversibleEmbedding(VOCAB, WIDTH, tie_weights=False)
    model = keras.Model([tokens, hidden], [layer(tokens), layer(hidden, reverse=True)])
    n = 16
    ids = np.tile(np.arange(VOCAB), n * T // VOCAB + 1)[: n * T]
    ids = rng.permutation(ids).reshape(n, T).astype(np.int32)  # every token occurs
    h = rng.normal(size=(n, T_REV, WIDTH))
    y_emb, y_rev = rng.normal(size=(n, T, WIDTH)), rng.normal(size=(n, T_REV, VOCAB))
    _step_kfac(model, loss=["mse", "mse"])
    model.fit([ids, h], [y_emb, y_rev], batch_size=n, epochs=1, verbose=0, shuffle=False)
    means = np.stack([y_emb.reshape(-1, WIDTH)[ids.ravel() == v].mean(0) for v in range(VOCAB)])
    np.testing.assert_allclose(layer.embeddings.numpy(), means, rtol=1e-6, atol=1e-8)
    solution = np.linalg.lstsq(h.reshape(-1, WIDTH), y_rev.reshape(-1, VOCAB), rcond=None)[0]
    np.testing.assert_allclose(layer.reverse_embeddings.numpy(), solution, rtol=1e-6, atol=1e-8)


def test_a_block_variable_without_a_gradient_is_left_alone_and_the_rest_trains():
    """An untied table used only in reverse: Keras gives its embeddings no gradient."""

    class ReverseOnly(keras.Model):
        def __init__(self):
            super().__init__()
            self.table = keras.layers.ReversibleEmbedding(8, 4, tie_weights=False)

        def build(self, shape):
            self.table.build((None,))

        def call(self, h):
            return self.table(h, reverse=True)

    keras.utils.set_random_seed(0)
    model = ReverseOnly()
    model.build((None, 4))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss=loss, invert_every=1)
    model.compile(optimizer=opt, loss=loss)
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.random.default_rng(1).integers(0, 8, size=16)
    embeddings, reverse = model.table.embeddings, model.table.reverse_embeddings
    before = embeddings.numpy().copy(), reverse.numpy().copy()
    first = model.evaluate(x, y, verbose=0)
    with pytest.warns(UserWarning, match="Gradients do not exist"):
        model.fit(x, y, batch_size=8, epochs=3, verbose=0)
    np.testing.assert_array_equal(embeddings.numpy(), before[0])
    assert not np.allclose(reverse.numpy(), before[1])
    assert model.evaluate(x, y, verbose=0) < first
