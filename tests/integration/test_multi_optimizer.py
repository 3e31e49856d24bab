"""Kfac as a member of keras.optimizers.MultiOptimizer: K-FAC for some layers only."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac

LOSS = "sparse_categorical_crossentropy"
KFAC_ARGS = dict(
    learning_rate=0.25,
    damping=0.25,
    momentum=0.5,
    loss=LOSS,
    estimation_mode="exact",
    invert_every=2,
    seed=1,
)
RNG = np.random.default_rng(0)
X = RNG.integers(0, 7, size=(40, 2))
Y = RNG.integers(0, 3, size=40)


class Scale(keras.layers.Layer):
    """A layer K-FAC cannot register: left to the other optimizer."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def text_model(frozen=()) -> keras.Model:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((2,), dtype="int32")
    h = keras.layers.Embedding(7, 3, name="embedding")(inputs)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(4, activation="tanh", name="hidden")(h)
    h = Scale(name="scale")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(h)
    model = keras.Model(inputs, outputs)
    for name in frozen:
        model.get_layer(name).trainable = False
    return model


def adamw() -> keras.optimizers.Optimizer:
    return keras.optimizers.AdamW(0.05, weight_decay=0.1)


def multi_optimizer(model, kfac_map, **kfac_args):
    with pytest.warns(UserWarning, match="scale"):  # bound on the whole model first
        kfac_opt = kfac.Kfac(model=model, unsupported_layers="diagonal", **KFAC_ARGS, **kfac_args)
    mapping = keras.optimizers.OptimizerMap(adamw(), {key: kfac_opt for key in kfac_map})
    return kfac_opt, keras.optimizers.MultiOptimizer(mapping)


OTHERS = ("embedding", "scale", "head")


def test_kfac_layers_update_as_kfac_alone_and_the_rest_as_adamw_alone(float64):
    model = text_model()
    kfac_opt, optimizer = multi_optimizer(model, ["hidden/.*"])
    model.compile(optimizer=optimizer, loss=LOSS)
    # References, each training only its share (the other layers frozen at the
    # multi-optimizer model's weights before every step).
    kfac_alone = text_model(frozen=OTHERS)
    kfac_alone.compile(optimizer=kfac.Kfac(model=kfac_alone, **KFAC_ARGS), loss=LOSS)
    adamw_alone = text_model(frozen=("hidden",))
    adamw_alone.compile(optimizer=adamw(), loss=LOSS)
    initial = model.get_weights()
    for step in range(5):
        batch = slice(8 * step, 8 * step + 8)
        for reference in (kfac_alone, adamw_alone):
            for name in ("hidden", *OTHERS):
                reference.get_layer(name).set_weights(model.get_layer(name).get_weights())
        for trained in (model, kfac_alone, adamw_alone):
            trained.train_on_batch(X[batch], Y[batch])
        for name in ("hidden", *OTHERS):
            reference = kfac_alone if name == "hidden" else adamw_alone
            for got, want in zip(
                model.get_layer(name).get_weights(), reference.get_layer(name).get_weights()
            ):
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
    # K-FAC registered only the layer it was given; it inverted on schedule.
    assert [block.name for block in kfac_opt.curvature.blocks] == ["hidden"]
    assert int(kfac_opt.iterations.numpy()) == 5
    assert int(kfac_opt.curvature.inversions.numpy()) == 2 * 3
    assert all(not np.allclose(a, b) for a, b in zip(model.get_weights(), initial))


def test_a_layer_split_between_kfac_and_another_optimizer_is_refused(float64):
    model = text_model()
    _, optimizer = multi_optimizer(model, ["hidden/kernel"])
    model.compile(optimizer=optimizer, loss=LOSS)
    with pytest.raises(ValueError, match="would be split.*hidden/kernel.*hidden/bias"):
        model.fit(X, Y, batch_size=8, verbose=0)


def test_adaptive_kfac_in_a_multi_optimizer_is_refused(float64):
    model = text_model()
    with pytest.warns(UserWarning, match="scale"):
        kfac_opt = kfac.Kfac(
            model=model,
            damping=0.25,
            adaptive=True,
            loss=LOSS,
            unsupported_layers="diagonal",
        )
    optimizer = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(adamw(), {"hidden/.*": kfac_opt})
    )
    model.compile(optimizer=optimizer, loss=LOSS)
    with pytest.raises(ValueError, match="must train all of the model's trainable variables"):
        model.fit(X, Y, batch_size=8, verbose=0)


def test_two_kfacs_in_one_multi_optimizer_are_refused(float64):
    model = text_model()
    first, optimizer = multi_optimizer(model, ["hidden/.*"])
    with pytest.warns(UserWarning, match="scale"):
        second = kfac.Kfac(model=model, unsupported_layers="diagonal", **KFAC_ARGS)
    optimizer = keras.optimizers.MultiOptimizer(
        keras.optimizers.OptimizerMap(adamw(), {"hidden/.*": first, "head/.*": second})
    )
    model.compile(optimizer=optimizer, loss=LOSS)
    with pytest.raises(ValueError, match="holds 2 Kfac optimizers"):
        model.fit(X, Y, batch_size=8, verbose=0)


def test_two_replicas_train_a_multi_optimizer_like_one(float64):
    def trained(strategy):
        with strategy.scope():
            model = text_model()
            _, optimizer = multi_optimizer(model, ["hidden/.*"])
            model.compile(optimizer=optimizer, loss=LOSS)
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        return model.get_weights()

    mirrored = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    for got, want in zip(trained(mirrored), trained(tf.distribute.get_strategy())):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
