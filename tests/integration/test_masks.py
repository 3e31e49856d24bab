"""Keras masks in the curvature: padded positions carry no weight, valid ones are
renormalised as Keras' loss does, so a masked model and the same model with the
equivalent explicit sample weights have identical factors, updates and losses."""

import keras
import numpy as np

import kfac_dist as kfac

B, T, VOCAB, WIDTH, CLASSES = 6, 5, 7, 4, 3
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(1, VOCAB, size=(B, T))
LENGTHS = np.array([5, 3, 1, 4, 2, 5])
TOKENS[np.arange(T)[None, :] >= LENGTHS[:, None]] = 0  # id 0 pads
MASK = (TOKENS != 0).astype("float32")
LABELS = RNG.integers(0, CLASSES, size=(B, T))


def _sequence_model(mask_zero: bool) -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(VOCAB, WIDTH, mask_zero=mask_zero),
            keras.layers.Dense(WIDTH, activation="tanh"),
            keras.layers.Dense(CLASSES),
        ]
    )


def _train(model, sample_weight=None, steps=2):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = kfac.Kfac(
        learning_rate=0.1,
        damping=0.01,
        model=model,
        loss=loss,
        estimation_mode="exact",
        invert_every=1,
        momentum=0.5,
        seed=3,
    )
    model.compile(optimizer=opt, loss=loss)
    history = model.fit(
        TOKENS,
        LABELS,
        sample_weight=sample_weight,
        batch_size=B,
        epochs=steps,
        verbose=0,
        shuffle=False,
    )
    return opt, history.history["loss"]


def test_masked_model_equals_the_model_with_the_equivalent_sample_weights():
    masked = _sequence_model(mask_zero=True)
    masked_opt, masked_loss = _train(masked)
    weighted = _sequence_model(mask_zero=False)
    # Keras' mask under sum_over_batch_size: 0 on padding, total/valid elsewhere.
    equivalent = MASK * MASK.size / MASK.sum()
    weighted_opt, weighted_loss = _train(weighted, sample_weight=equivalent)
    np.testing.assert_allclose(masked_loss, weighted_loss, rtol=1e-6)
    for a, b in zip(masked_opt.curvature.factors(), weighted_opt.curvature.factors()):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    for a, b in zip(masked.trainable_variables, weighted.trainable_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)


def test_padded_positions_never_enter_the_input_factors():
    model = _sequence_model(mask_zero=True)
    embeddings = model.layers[0].embeddings.numpy().copy()
    opt, _ = _train(model, steps=1)  # one step: the factors are this batch's
    embedding_a, _, dense_a, *_ = [f.numpy() for f in opt.curvature.factors()]
    assert embedding_a[0] == 0.0  # the padding id is never counted
    valid = MASK.astype(bool)
    weight = MASK.size / MASK.sum()
    counts = np.bincount(TOKENS[valid], minlength=VOCAB) * weight / B
    np.testing.assert_allclose(embedding_a, counts, rtol=1e-5)
    rows = np.concatenate([embeddings[TOKENS[valid]], np.ones((valid.sum(), 1))], axis=1)
    np.testing.assert_allclose(dense_a, weight * rows.T @ rows / B, rtol=1e-5, atol=1e-7)


def test_a_mask_consumed_inside_the_model_zeroes_padded_rows_of_the_layers_before():
    """Masked pooling: the loss has no positions, the Dense before the pooling
    sees the mask on its input and leaves padded rows out of A."""
    keras.utils.set_random_seed(2)
    model = keras.Sequential(
        [
            keras.Input((T,), dtype="int32"),
            keras.layers.Embedding(VOCAB, WIDTH, mask_zero=True),
            keras.layers.Dense(WIDTH, activation="tanh"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    embeddings = model.layers[0].embeddings.numpy().copy()
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = kfac.Kfac(learning_rate=0.1, damping=0.01, model=model, loss=loss, invert_every=1)
    model.compile(optimizer=opt, loss=loss)
    model.fit(TOKENS, LABELS[:, 0], batch_size=B, epochs=1, verbose=0, shuffle=False)
    dense_a = opt.curvature.factors()[2].numpy()
    valid = MASK.astype(bool)
    rows = np.concatenate([embeddings[TOKENS[valid]], np.ones((valid.sum(), 1))], axis=1)
    np.testing.assert_allclose(dense_a, rows.T @ rows / B, rtol=1e-5, atol=1e-7)
    assert np.isfinite(model.layers[1].kernel.numpy()).all()


def test_a_masking_layer_equals_the_equivalent_sample_weights():
    features = RNG.normal(size=(B, T, 3)).astype("float32")
    features[~MASK.astype(bool)] = 0.0

    def model(masking: bool) -> keras.Model:
        keras.utils.set_random_seed(5)
        layers = [keras.Input((T, 3))]
        layers += [keras.layers.Masking(0.0)] if masking else []
        layers += [keras.layers.Dense(WIDTH, activation="tanh"), keras.layers.Dense(CLASSES)]
        return keras.Sequential(layers)

    results = []
    for masking, weights in ((True, None), (False, MASK * MASK.size / MASK.sum())):
        net = model(masking)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        opt = kfac.Kfac(
            learning_rate=0.1, damping=0.01, model=net, loss=loss, invert_every=1, seed=3
        )
        net.compile(optimizer=opt, loss=loss)
        history = net.fit(
            features, LABELS, sample_weight=weights, batch_size=B, epochs=2, verbose=0
        )
        results.append((history.history["loss"], opt.curvature.factors(), net.get_weights()))
    (loss_a, factors_a, weights_a), (loss_b, factors_b, weights_b) = results
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    for a, b in zip(factors_a, factors_b):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-7)
    for a, b in zip(weights_a, weights_b):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
