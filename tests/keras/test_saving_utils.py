"""Saving with Kfac, and the two code samples of kfac 0.2.4's Keras README."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist
import kfac_dist as kfac

RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 5)).astype("float32")
Y = RNG.integers(0, 3, size=64)


def classifier(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def test_saved_and_loaded_model_follows_the_same_trajectory_in_sampled_mode(tmp_path):
    def make():
        model = classifier()
        opt = kfac.keras.optimizers.Kfac(
            learning_rate=0.1,
            damping=0.01,
            model=model,
            loss="sparse_categorical_crossentropy",
            invert_every=3,
            seed=5,
        )
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    original = make()
    original.fit(X, Y, batch_size=16, epochs=2, verbose=0, shuffle=False)
    original.save(tmp_path / "m.keras")
    loaded = kfac.keras.saving_utils.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.config.estimation_mode == "sampled"
    for a, b in zip(original.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    original.fit(X, Y, batch_size=16, epochs=3, verbose=0, shuffle=False)  # 12 more steps
    loaded.fit(X, Y, batch_size=16, epochs=3, verbose=0, shuffle=False)
    for a, b in zip(original.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_plain_keras_load_points_to_the_loader(tmp_path):
    model = classifier()
    model.compile(
        optimizer=kfac.Kfac(learning_rate=0.1, damping=0.01, model=model),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match="saving_utils.load_model"):
        keras.models.load_model(tmp_path / "m.keras")


def test_reference_readme_first_sample_runs_unchanged():
    # From kfac 0.2.4's Keras README, with a real model and data for "...".
    model = tf.keras.Model(*_functional_parts())
    loss = "sparse_categorical_crossentropy"  # or a tf.keras.losses.* instance

    optimizer = kfac.keras.optimizers.Kfac(
        learning_rate=0.001, damping=0.01, model=model, loss=loss
    )

    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    history = model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()


def test_reference_readme_save_sample_runs_with_the_two_allowed_changes(tmp_path):
    model = tf.keras.Model(*_functional_parts(units=3, activation=None))
    loss = (
        tf.keras.losses.MeanSquaredError()
    )  # the README's tf.keras.losses.MSE() is not callable so
    optimizer = kfac.keras.optimizers.Kfac(
        learning_rate=0.001, damping=0.01, model=model, loss=loss
    )
    model.compile(optimizer, loss)
    targets = RNG.normal(size=(64, 3)).astype("float32")
    model.fit(X, targets, verbose=0)
    model.save(str(tmp_path / "saved_model.keras"))  # .keras, not .hdf5, on Keras 3
    loaded_model = kfac.keras.saving_utils.load_model(str(tmp_path / "saved_model.keras"))
    loaded_model.fit(X, targets, verbose=0)
    assert loaded_model.optimizer.model is loaded_model


def _functional_parts(units=3, activation="softmax"):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return inputs, keras.layers.Dense(units, activation=activation)(hidden)


def test_package_exports_the_seed_namespace():
    assert kfac_dist.keras.optimizers.Kfac is kfac_dist.Kfac
    assert callable(kfac_dist.keras.saving_utils.load_model)
