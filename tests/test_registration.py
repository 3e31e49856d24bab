"""Walking models into blocks: supported layers, nesting, frozen layers, bad input."""

import keras
import numpy as np
import pytest

import kfac_dist as kfac
from kfac_dist import blocks, registration


class Scale(keras.layers.Layer):
    """A trainable layer K-FAC does not know."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="scale")

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


# --- layers that own sublayers: innermost owners, one block per variable -------


class TwoDense(keras.layers.Layer):
    """A custom layer with inner Dense layers and an inner layer K-FAC does not know."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(4, activation="tanh", name="inner")
        self.scale = Scale(name="scale")
        self.outer = keras.layers.Dense(3, name="outer")

    def call(self, inputs):
        return self.outer(self.scale(self.inner(inputs)))


class TokenAndPosition(keras.layers.Layer):
    """A container of two Embeddings, as in the Keras text examples."""

    def __init__(self, length: int, vocab: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.tokens = keras.layers.Embedding(vocab, dim, name="tokens")
        self.positions = keras.layers.Embedding(length, dim, name="positions")

    def call(self, inputs):
        positions = keras.ops.arange(keras.ops.shape(inputs)[-1])
        return self.tokens(inputs) + self.positions(positions)


def _sequence_model(kind: str) -> keras.Model:
    keras.utils.set_random_seed(1)  # the same initial weights whatever ran before
    inputs = keras.Input((5, 4))
    if kind == "mha":
        h = keras.layers.MultiHeadAttention(2, 3, name="mha")(inputs, inputs)
        h = keras.layers.MultiHeadAttention(2, 3, name="mha2")(h, h)
        h = keras.layers.GlobalAveragePooling1D()(h)
    elif kind == "lstm":
        h = keras.layers.LSTM(3, name="lstm")(inputs)
    elif kind == "gru":
        h = keras.layers.GRU(3, name="gru")(inputs)
    else:
        h = keras.layers.GlobalAveragePooling1D()(TwoDense(name="two_dense")(inputs))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(h))


def _variable_paths(block) -> list[str]:
    return [v.path for v in block.variables]


INNERMOST = {
    # model kind: {unsupported owner: its variables}, besides the Dense blocks
    # (MultiHeadAttention registers through its EinsumDense sublayers:
    # tests/blocks/test_attention.py)
    "lstm": {
        "lstm/lstm_cell": [
            "lstm/lstm_cell/kernel",
            "lstm/lstm_cell/recurrent_kernel",
            "lstm/lstm_cell/bias",
        ]
    },
    "gru": {
        "gru/gru_cell": [
            "gru/gru_cell/kernel",
            "gru/gru_cell/recurrent_kernel",
            "gru/gru_cell/bias",
        ]
    },
    "custom": {"two_dense/scale": ["two_dense/scale/scale"]},
}


@pytest.mark.parametrize("kind", list(INNERMOST))
def test_unsupported_error_names_only_the_innermost_owners(kind):
    model = _sequence_model(kind)
    with pytest.raises(registration.UnsupportedLayerError) as error:
        registration.collect_blocks(model)
    message = str(error.value).split(". Supported layers")[0]
    named = {name.split("' (")[0] for name in message.split("layer(s) '")[1].split(", '")}
    expected = {path.rsplit("/", 1)[-1] for path in INNERMOST[kind]}
    assert named == expected
    # Containers whose own variables are none are not named; sublayers say where they sit.
    for container in ("'mha' (", "'mha2' (", "'lstm' (", "'gru' (", "'two_dense' (", "'inner' ("):
        assert container not in message


@pytest.mark.parametrize("kind", list(INNERMOST))
def test_diagonal_opt_in_preconditions_each_variable_once_by_its_innermost_owner(kind):
    model = _sequence_model(kind)
    with pytest.warns(UserWarning, match="diagonal block"):
        found = registration.collect_blocks(model, unsupported_layers="diagonal")
    generic = sorted(
        (_variable_paths(b) for b in found if isinstance(b, blocks.GenericDiagonalBlock)),
    )
    assert generic == sorted(INNERMOST[kind].values())
    dense = {b.name: _variable_paths(b) for b in found if isinstance(b, blocks.DenseBlock)}
    assert dense["head"] == ["head/kernel", "head/bias"]
    if kind == "custom":
        assert dense["inner"] == ["two_dense/inner/kernel", "two_dense/inner/bias"]
        assert dense["outer"] == ["two_dense/outer/kernel", "two_dense/outer/bias"]
    registered = [path for b in found for path in _variable_paths(b)]
    assert sorted(registered) == sorted(v.path for v in model.trainable_variables)
    assert all(b.num_params > 0 for b in found)
    assert len({b.name for b in found}) == len(found)


@pytest.mark.parametrize("kind", list(INNERMOST))
def test_models_with_sublayer_owners_train_with_the_diagonal_opt_in(kind):
    model = _sequence_model(kind)
    with pytest.warns(UserWarning, match="diagonal block"):
        opt = kfac.Kfac(
            learning_rate=0.05,
            damping=0.1,
            model=model,
            loss="mse",
            unsupported_layers="diagonal",
            invert_every=1,
            seed=0,
        )
    model.compile(optimizer=opt, loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5, 4)).astype("float32")
    y = np.stack([x[:, :, 0].mean(1), x[:, :, 1].mean(1)], axis=1).astype("float32")
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert int(opt.curvature.inversions.numpy()) > 0
    for variable, start in zip(model.trainable_variables, before):
        if variable.path.endswith("key/bias"):
            continue  # softmax attention is invariant to it: its gradient is 0
        assert not np.allclose(variable.numpy(), start), variable.path


def test_container_of_supported_layers_needs_no_registration_and_trains():
    inputs = keras.Input((6,), dtype="int32")
    h = TokenAndPosition(6, 11, 4, name="token_and_position")(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="head")(h))
    found = registration.collect_blocks(model)  # no error: every variable is covered
    assert {b.name: type(b) for b in found} == {
        "tokens": blocks.EmbeddingBlock,
        "positions": blocks.EmbeddingBlock,
        "head": blocks.DenseBlock,
    }
    opt = kfac.Kfac(learning_rate=0.05, damping=0.1, model=model, invert_every=1, seed=0)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 11, size=(64, 6)).astype("int32")
    y = (x[:, 0] > 5).astype("int32")
    history = model.fit(x, y, batch_size=16, epochs=4, verbose=0, shuffle=False)
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_subclass_overriding_call_is_not_taken_for_the_standard_layer():
    class ScaledDense(keras.layers.Dense):
        def call(self, inputs):
            return 2.0 * super().call(inputs)

    model = keras.Sequential([keras.Input((3,)), ScaledDense(2, name="scaled")])
    with pytest.raises(registration.UnsupportedLayerError, match="'scaled' \\(ScaledDense\\)"):
        registration.collect_blocks(model)


def test_keras_reversible_embedding_gets_its_own_block_not_the_embeddings():
    # Its call also maps hidden states back to logits (reverse=True), with the
    # same table: the Embedding block's token-count factor alone would be wrong.
    inputs = keras.Input((4,), dtype="int32")
    embedding = keras.layers.ReversibleEmbedding(9, 3, name="tied")
    logits = embedding(embedding(inputs), reverse=True)
    model = keras.Model(inputs, logits)
    (block,) = registration.collect_blocks(model)
    assert type(block) is blocks.ReversibleEmbeddingBlock and block.layer is embedding


class ScaledEmbedding(keras.layers.ReversibleEmbedding):
    """A ReversibleEmbedding (so an Embedding) whose call computes something else."""

    def call(self, inputs, reverse=False):
        return 2.0 * super().call(inputs, reverse=reverse)


def test_a_reversible_embedding_subclass_overriding_call_is_taken_for_neither_base():
    inputs = keras.Input((4,), dtype="int32")
    model = keras.Model(inputs, ScaledEmbedding(9, 3, name="scaled")(inputs))
    with pytest.raises(registration.UnsupportedLayerError, match="'scaled' \\(ScaledEmbedding\\)"):
        registration.collect_blocks(model)


# --- a variable registered twice is an error naming it -----------------------


def test_registering_a_container_and_its_parts_by_hand_names_the_variable():
    model = _sequence_model("mha")
    mha = model.get_layer("mha")
    lc = kfac.LayerCollection()
    lc.register_generic(mha.trainable_variables, name="mha")
    with pytest.raises(ValueError, match="mha/query/kernel .*already in block 'mha'"):
        lc.register_generic(mha._query_dense.trainable_variables, name="query")


def test_registering_a_layer_twice_by_hand_names_the_variable():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    lc = kfac.LayerCollection()
    lc.register_layer(model.get_layer("head"))
    with pytest.raises(ValueError, match="head/kernel"):
        lc.register_generic([model.get_layer("head").kernel], name="kernel_again")
    with pytest.raises(ValueError, match="registered twice"):
        lc.register_generic([model.get_layer("head").bias] * 2, name="bias_twice")


def test_by_hand_part_of_a_supported_layer_is_an_error_naming_the_variable():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    lc = kfac.LayerCollection()
    lc.register_generic([model.get_layer("head").kernel], name="kernel_only")
    with pytest.raises(ValueError, match="head/kernel .*'kernel_only'.*register_layer"):
        registration.collect_blocks(model, layer_collection=lc)


def test_by_hand_registration_of_a_whole_layer_replaces_its_automatic_block():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    lc = kfac.LayerCollection()
    lc.register_generic(model.get_layer("head").trainable_variables, name="head_diag")
    found = registration.collect_blocks(model, layer_collection=lc)
    assert [(b.name, type(b)) for b in found] == [("head_diag", blocks.GenericDiagonalBlock)]


def test_register_generic_without_variables_says_what_to_pass():
    with pytest.raises(ValueError, match="got no variables"):
        kfac.LayerCollection().register_generic([], name="empty")
