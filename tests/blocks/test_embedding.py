"""EmbeddingBlock against NumPy: A = diag(token counts)/b, G as Dense, and the
preconditioned update with a diagonal input factor in both inverse methods."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.blocks import CHOLESKY, EIGEN, KRON, EmbeddingBlock

B, T, VOCAB, WIDTH, C = 4, 3, 7, 3, 2
DAMPING = 0.2


@pytest.fixture(scope="module")
def embedding():
    rng = np.random.default_rng(0)
    layer = keras.layers.Embedding(VOCAB, WIDTH)
    layer.build((None, T))
    layer.embeddings.assign(rng.normal(size=(VOCAB, WIDTH)).astype(np.float32))
    block = EmbeddingBlock(layer)
    # Token 6 never occurs, token 2 often.
    ids = np.array([[2, 0, 2], [1, 2, 5], [3, 3, 2], [4, 0, 1]], dtype=np.int32)
    output, record = block.record(layer.call, tf.constant(ids))
    np.testing.assert_allclose(output.numpy(), layer.embeddings.numpy()[ids])
    grads = rng.normal(size=(C, B, T, WIDTH))
    return block, record, ids, grads


def test_embedding_factors_are_token_counts_and_output_moments(embedding):
    block, record, ids, grads = embedding
    a_stat, g_stat = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    counts = np.bincount(ids.ravel(), minlength=VOCAB)
    rows = grads.reshape(C, -1, WIDTH)
    expected_g = sum(rows[c].T @ rows[c] for c in range(C)) / (B * T)
    assert [tuple(a_stat.shape), tuple(g_stat.shape)] == block.factor_shapes()
    assert block.factor_shapes() == [(VOCAB,), (WIDTH, WIDTH)]
    np.testing.assert_allclose(a_stat.numpy(), counts / B, rtol=1e-6)
    np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-5, atol=1e-6)


def test_embedding_input_factor_is_the_one_hot_second_moment(embedding):
    block, record, ids, grads = embedding
    a_stat, _ = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    one_hot = np.eye(VOCAB)[ids.ravel()]
    full = one_hot.T @ one_hot / B
    np.testing.assert_allclose(np.diag(full), a_stat.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(full - np.diag(np.diag(full)), 0.0)


def test_embedding_used_twice_counts_tokens_of_both_uses(embedding):
    block, record, ids, grads = embedding
    more_ids = np.array([[6], [6], [0], [2]], dtype=np.int32)
    _, second = block.record(block.layer.call, tf.constant(more_ids))
    more_grads = np.random.default_rng(1).normal(size=(C, B, 1, WIDTH))
    a_stat, g_stat = block.statistics(
        [record, second],
        [tf.constant(grads, tf.float32), tf.constant(more_grads, tf.float32)],
        B,
    )
    counts = np.bincount(np.concatenate([ids.ravel(), more_ids.ravel()]), None, VOCAB)
    rows = np.concatenate([grads.reshape(C, -1, WIDTH), more_grads.reshape(C, -1, WIDTH)], axis=1)
    expected_g = sum(rows[c].T @ rows[c] for c in range(C)) / (B * (T + 1))
    np.testing.assert_allclose(a_stat.numpy(), counts / B, rtol=1e-6)
    np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
def test_embedding_precondition_with_diagonal_input_factor(embedding, method):
    block, record, ids, grads = embedding
    factors = block.statistics([record], [tf.constant(grads, tf.float32)], B)
    payloads = []
    for index in range(2):
        payload, retries = block.invert(index, factors, DAMPING, method)
        assert int(retries) == 0
        payloads.append(payload)
    assert [[tuple(p.shape) for p in pl] for pl in payloads] == block.payload_shapes(method)
    grad = np.random.default_rng(2).normal(size=(VOCAB, WIDTH))
    (update,) = block.precondition([tf.constant(grad, tf.float32)], payloads, DAMPING, method)
    a = np.diag(np.bincount(ids.ravel(), minlength=VOCAB) / B)
    rows = grads.reshape(C, -1, WIDTH)
    g = sum(rows[c].T @ rows[c] for c in range(C)) / (B * T)
    if method == CHOLESKY:
        pi = np.sqrt((np.trace(a) / VOCAB) / (np.trace(g) / WIDTH))
        root = np.sqrt(DAMPING)
        expected = (
            np.linalg.inv(a + pi * root * np.eye(VOCAB))
            @ grad
            @ np.linalg.inv(g + root / pi * np.eye(WIDTH))
        )
    else:
        system = np.kron(a, g) + DAMPING * np.eye(VOCAB * WIDTH)
        expected = np.linalg.solve(system, grad.reshape(-1)).reshape(grad.shape)
    assert update.shape == (VOCAB, WIDTH)
    np.testing.assert_allclose(update.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_embedding_supports_only_kron():
    layer = keras.layers.Embedding(VOCAB, WIDTH)
    layer.build((None, T))
    assert EmbeddingBlock(layer).approx == KRON
    with pytest.raises(ValueError, match="fisher_approx"):
        EmbeddingBlock(layer, "diagonal")


def test_embedding_statistics_follow_float64_floatx():
    previous = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        layer = keras.layers.Embedding(VOCAB, WIDTH)
        layer.build((None, T))
        block = EmbeddingBlock(layer)
        ids = np.array([[1, 2, 2], [0, 6, 1], [3, 3, 3], [5, 4, 0]])
        _, record = block.record(layer.call, tf.constant(ids))
        grads = np.random.default_rng(3).normal(size=(C, B, T, WIDTH))
        a_stat, g_stat = block.statistics([record], [tf.constant(grads)], B)
    finally:
        keras.config.set_floatx(previous)
    assert a_stat.dtype == g_stat.dtype == tf.float64
    rows = grads.reshape(C, -1, WIDTH)
    expected_g = sum(rows[c].T @ rows[c] for c in range(C)) / (B * T)
    np.testing.assert_allclose(a_stat.numpy(), np.bincount(ids.ravel(), None, VOCAB) / B)
    np.testing.assert_allclose(g_stat.numpy(), expected_g, rtol=1e-12)
