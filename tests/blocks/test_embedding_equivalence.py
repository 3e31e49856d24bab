"""The Embedding block is the Dense block on one-hot inputs: same factors, same
updates, step after step, in a Conv1D text classifier (an independent check of
the diagonal input factor, its damping and its preconditioning)."""

import keras
import numpy as np
import tensorflow as tf

import kfac_dist as kfac

VOCAB, T, N, WIDTH = 30, 6, 64, 8


def _classifier(one_hot: bool) -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = [keras.Input((T,), dtype="int32")]
    if one_hot:
        layers += [
            keras.layers.Lambda(lambda t: tf.one_hot(t, VOCAB), output_shape=(T, VOCAB)),
            keras.layers.Dense(WIDTH, use_bias=False),
        ]
    else:
        layers += [keras.layers.Embedding(VOCAB, WIDTH)]
    layers += [
        keras.layers.Conv1D(WIDTH, 3, activation="relu"),
        keras.layers.GlobalMaxPooling1D(),
        keras.layers.Dense(2),
    ]
    return keras.Sequential(layers)


def test_embedding_trains_exactly_like_a_dense_layer_on_one_hot_inputs():
    rng = np.random.default_rng(0)
    x = rng.integers(0, VOCAB, size=(N, T))
    y = rng.integers(0, 2, size=(N,))
    embedded, one_hot = _classifier(False), _classifier(True)
    one_hot.layers[1].kernel.assign(embedded.layers[0].embeddings)
    for a, b in zip(embedded.layers[1:], one_hot.layers[2:]):
        b.set_weights(a.get_weights())
    results = []
    for model in (embedded, one_hot):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        opt = kfac.Kfac(
            learning_rate=0.1,
            damping=0.01,
            norm_constraint=0.01,
            model=model,
            loss=loss,
            invert_every=1,
            seed=1,
        )
        model.compile(optimizer=opt, loss=loss)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, shuffle=False)
        results.append((history.history, model.get_weights(), opt.curvature.factors()))
    (history_e, weights_e, factors_e), (history_o, weights_o, factors_o) = results
    np.testing.assert_allclose(history_e["loss"], history_o["loss"], rtol=1e-5)
    np.testing.assert_allclose(history_e["kl_clip"], history_o["kl_clip"], rtol=1e-5)
    for a, b in zip(weights_e, weights_o):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The embedding's diagonal input factor is the one-hot Dense factor's diagonal.
    np.testing.assert_allclose(factors_e[0].numpy(), np.diag(factors_o[0].numpy()), atol=1e-7)
    np.testing.assert_allclose(np.diag(np.diag(factors_o[0].numpy())), factors_o[0].numpy())
    for a, b in zip(factors_e[1:], factors_o[1:]):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
