"""Walking models into blocks: supported layers, nesting, frozen layers, bad input."""

import keras
import numpy as np
import pytest

import kfac_dist as kfac
from kfac_dist import blocks, registration


class Scale(keras.layers.Layer):
    """A trainable layer K-FAC does not know."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def test_supported_layers_get_their_block_kinds_and_nested_models_are_flattened():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="inner_dense")])
    inputs = keras.Input((6, 3))
    h = keras.layers.Conv1D(4, 3, padding="causal", name="conv")(inputs)
    h = keras.layers.LayerNormalization(name="ln")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    h = inner(h)
    frozen = keras.layers.Dense(4, name="frozen")
    frozen.trainable = False
    h = frozen(h)
    outputs = keras.layers.Dense(2, name="head")(keras.layers.BatchNormalization(name="bn")(h))
    model = keras.Model(inputs, outputs)
    found = {b.name: type(b) for b in registration.collect_blocks(model)}
    assert found == {
        "conv": blocks.ConvBlock,
        "ln": blocks.ScaleShiftBlock,
        "inner_dense": blocks.DenseBlock,
        "bn": blocks.ScaleShiftBlock,
        "head": blocks.DenseBlock,
    }


def test_unsupported_layer_error_names_it_and_how_to_register():
    model = keras.Sequential([keras.Input((3,)), Scale(name="my_scale"), keras.layers.Dense(2)])
    with pytest.raises(registration.UnsupportedLayerError) as error:
        kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")
    message = str(error.value)
    assert "'my_scale' (Scale)" in message
    assert "Dense" in message and "LayerNormalization" in message
    assert "unsupported_layers='diagonal'" in message and "register_generic" in message


def test_unsupported_layer_opt_in_gets_a_diagonal_block_with_a_warning_and_trains():
    model = keras.Sequential([keras.Input((3,)), Scale(name="my_scale"), keras.layers.Dense(2)])
    with pytest.warns(UserWarning, match="my_scale"):
        opt = kfac.Kfac(
            learning_rate=0.1, damping=0.1, model=model, loss="mse", unsupported_layers="diagonal"
        )
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    before = model.layers[0].scale.numpy().copy()
    model.fit(x, x[:, :2], batch_size=16, epochs=1, verbose=0)
    assert not np.allclose(model.layers[0].scale.numpy(), before)
    assert any(isinstance(b, blocks.GenericDiagonalBlock) for b in opt.curvature.blocks)


def test_layer_collection_registers_generic_variables_and_losses():
    scale = Scale(name="my_scale")
    model = keras.Sequential([keras.Input((3,)), scale, keras.layers.Dense(2)])
    lc = kfac.LayerCollection()
    lc.register_generic(scale.trainable_variables, name="scale_block")
    lc.register_loss(0, "mean_squared_error")
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, layer_collection=lc)
    model.compile(optimizer=opt, loss="mse")
    x = np.random.default_rng(0).normal(size=(32, 3)).astype("float32")
    model.fit(x, x[:, :2], batch_size=16, epochs=1, verbose=0)
    assert [b.name for b in opt.curvature.blocks][0] == "scale_block"


def test_unsupported_loss_raises_naming_it():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mae")
    model.compile(optimizer=opt, loss="mae")
    x = np.zeros((8, 3), "float32")
    with pytest.raises(ValueError, match="'mae'.*register_loss"):
        model.fit(x, x[:, :2], verbose=0)


def test_two_output_model_with_two_losses_and_weights_trains():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(5, activation="tanh")(inputs)
    regression = keras.layers.Dense(2, name="reg")(shared)
    classes = keras.layers.Dense(3, activation="softmax", name="cls")(shared)
    model = keras.Model(inputs, [regression, classes])
    loss = {"reg": "mse", "cls": "sparse_categorical_crossentropy"}
    opt = kfac.Kfac(
        learning_rate=0.05,
        damping=0.1,
        model=model,
        loss=loss,
        loss_weights={"reg": 0.5, "cls": 2.0},
    )
    model.compile(optimizer=opt, loss=loss, loss_weights={"reg": 0.5, "cls": 2.0})
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = {"reg": rng.normal(size=(64, 2)).astype("float32"), "cls": rng.integers(0, 3, 64)}
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    kinds = [o.kind for o in opt.output_losses(2)]
    assert kinds == ["mean_squared_error", "sparse_categorical_crossentropy"]
    assert [o.weight for o in opt.output_losses(2)] == [0.5, 2.0]


def test_two_input_model_with_a_layer_used_twice_trains():
    left, right = keras.Input((4,), name="left"), keras.Input((4,), name="right")
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    merged = keras.layers.Concatenate()([shared(left), shared(right)])
    model = keras.Model([left, right], keras.layers.Dense(2, name="head")(merged))
    opt = kfac.Kfac(learning_rate=0.05, damping=0.1, model=model, loss="mse")
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(1)
    x = [rng.normal(size=(64, 4)).astype("float32") for _ in range(2)]
    y = rng.normal(size=(64, 2)).astype("float32")
    history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert [b.name for b in opt.curvature.blocks] == ["shared", "head"]
