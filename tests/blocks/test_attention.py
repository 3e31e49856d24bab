"""Attention layers register through their EinsumDense sublayers: every variable once,
with structured blocks, and a tiny transformer encoder trains with K-FAC.

MultiHeadAttention and GroupQueryAttention own no variables themselves:
their query/key/value/output projections are EinsumDense layers, each its
own Kronecker block (`unsupported_layers="error"` holds), named after its
path where the sublayer names repeat ('query' in every attention layer).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

import kfac_dist as kfac
from kfac_dist import registration
from kfac_dist.blocks import (
    DenseBlock,
    EinsumDenseBlock,
    GenericDiagonalBlock,
    ScaleShiftBlock,
)

N, T, D, VOCAB = 32, 6, 8, 9
PARTS = ("query", "key", "value", "attention_output")


def _attention(kind: str, name: str = "attention") -> keras.layers.Layer:
    if kind == "mha":
        return keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, name=name)
    return keras.layers.GroupQueryAttention(
        head_dim=4, num_query_heads=2, num_key_value_heads=1, name=name
    )


def _encoder(kind: str, masking: str) -> keras.Model:
    """Input → self-attention + residual → LN → Dense FFN + residual → LN → pool → Dense."""
    keras.utils.set_random_seed(0)
    if masking == "mask_zero":
        tokens = keras.Input((T,), dtype="int32")
        inputs: list = [tokens]
        h = keras.layers.Embedding(VOCAB, D, mask_zero=True, name="embedding")(tokens)
    else:
        inputs = [keras.Input((T, D))]
        h = inputs[0]
    kwargs = {}
    if masking == "attention_mask":
        inputs.append(keras.Input((T, T), dtype="bool"))
        kwargs["attention_mask"] = inputs[1]
    a = _attention(kind)(h, h, **kwargs)
    h = keras.layers.LayerNormalization(name="ln1")(keras.layers.Add()([h, a]))
    f = keras.layers.Dense(16, activation="relu", name="ffn_in")(h)
    f = keras.layers.Dense(D, name="ffn_out")(f)
    h = keras.layers.LayerNormalization(name="ln2")(keras.layers.Add()([h, f]))
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(2, name="head")(h)
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], outputs)


def _data(masking: str) -> tuple:
    rng = np.random.default_rng(0)
    if masking == "mask_zero":
        lengths = rng.integers(2, T + 1, size=N)
        x = rng.integers(1, VOCAB, size=(N, T))
        x[np.arange(T)[None] >= lengths[:, None]] = 0  # id 0 pads
        y = (np.where(x > 0, x, 0).sum(1) / lengths > VOCAB / 2).astype("int32")
        return x.astype("int32"), y
    x = rng.normal(size=(N, T, D)).astype("float32")
    y = (x[:, :, 0].mean(1) > 0).astype("int32")
    if masking == "attention_mask":
        causal = np.tril(np.ones((T, T), bool))
        return [x, np.broadcast_to(causal, (N, T, T)).copy()], y
    return x, y


def _assert_every_variable_once_in_structured_blocks(model: keras.Model, blocks: list) -> None:
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    registered = [v.path for b in blocks for v in b.variables]
    assert sorted(registered) == sorted(v.path for v in model.trainable_variables)
    assert len(set(registered)) == len(registered)
    assert len({b.name for b in blocks}) == len(blocks)
    kinds = {b.name: type(b) for b in blocks}
    for part in PARTS:
        assert kinds[part] is EinsumDenseBlock
    for name in ("ffn_in", "ffn_out", "head"):
        assert kinds[name] is DenseBlock
    assert kinds["ln1"] is ScaleShiftBlock and kinds["ln2"] is ScaleShiftBlock


@pytest.mark.parametrize(
    "kind, masking, sharing",
    [
        ("mha", "none", "expand"),
        ("mha", "none", "reduce"),
        ("mha", "attention_mask", "expand"),
        ("mha", "mask_zero", "expand"),
        ("gqa", "none", "expand"),
        ("gqa", "attention_mask", "expand"),
        ("gqa", "mask_zero", "expand"),
    ],
)
def test_a_tiny_transformer_encoder_registers_fully_and_trains(kind, masking, sharing):
    model = _encoder(kind, masking)
    blocks = registration.collect_blocks(model, unsupported_layers="error")
    _assert_every_variable_once_in_structured_blocks(model, blocks)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = kfac.Kfac(
        learning_rate=0.1,
        damping=0.1,
        momentum=0.5,
        model=model,
        loss=loss,
        unsupported_layers="error",
        kron_sharing=sharing,
        invert_every=1,
        seed=0,
    )
    _assert_every_variable_once_in_structured_blocks(model, optimizer.curvature.blocks)
    model.compile(optimizer=optimizer, loss=loss)
    x, y = _data(masking)
    before = {v.path: v.numpy().copy() for v in model.trainable_variables}
    history = model.fit(x, y, batch_size=N, epochs=5, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    attention = model.get_layer("attention")
    for sublayer in (attention._query_dense, attention._value_dense, attention._output_dense):  # noqa: SLF001
        for variable in sublayer.trainable_variables:
            assert not np.allclose(variable.numpy(), before[variable.path]), variable.path


def test_repeated_sublayer_names_get_their_paths():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((T, D))
    h = _attention("mha", "mha")(inputs, inputs)
    h = _attention("gqa", "gqa")(h, h)
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h)))
    blocks = registration.collect_blocks(model, unsupported_layers="error")
    names = {b.name: [v.path for v in b.variables] for b in blocks}
    for container in ("mha", "gqa"):
        for part in PARTS:
            assert names[f"{container}.{part}"] == [
                f"{container}/{part}/kernel",
                f"{container}/{part}/bias",
            ]
    assert names["head"] == ["head/kernel", "head/bias"]
    assert len(blocks) == 9


def test_cross_attention_projections_record_their_own_inputs(float64):
    """After one step (no moving average), A of the query is that of the query
    input's rows, A of the key and of the value that of the value input's."""
    keras.utils.set_random_seed(0)
    query, value = keras.Input((T, D)), keras.Input((T - 2, 5))
    h = keras.layers.MultiHeadAttention(num_heads=2, key_dim=3, name="cross")(query, value)
    model = keras.Model([query, value], keras.layers.GlobalAveragePooling1D()(h))
    optimizer = kfac.Kfac(
        learning_rate=0.01,
        damping=0.1,
        model=model,
        loss="mse",
        cov_ema_decay=0.0,
        invert_every=1,
        unsupported_layers="error",
    )
    model.compile(optimizer=optimizer, loss="mse")
    rng = np.random.default_rng(1)
    q, v = rng.normal(size=(N, T, D)), rng.normal(size=(N, T - 2, 5))
    model.fit([q, v], rng.normal(size=(N, D)), batch_size=N, epochs=1, verbose=0)
    factors = iter(optimizer.curvature.factors())
    by_block = {b.name: [next(factors), next(factors)] for b in optimizer.curvature.blocks}

    def moments(x: np.ndarray) -> np.ndarray:
        rows = np.concatenate([x.reshape(-1, x.shape[-1]), np.ones((x[..., 0].size, 1))], 1)
        return rows.T @ rows / N

    np.testing.assert_allclose(by_block["query"][0].numpy(), moments(q), rtol=1e-10)
    for part in ("key", "value"):
        np.testing.assert_allclose(by_block[part][0].numpy(), moments(v), rtol=1e-10)
    # heads × head_dim outputs, and inputs of the output projection.
    assert by_block["query"][1].shape == (6, 6) and by_block["value"][1].shape == (6, 6)
    assert by_block["attention_output"][0].shape == (7, 7)
    assert by_block["attention_output"][1].shape == (D, D)


def test_an_unsupported_einsum_sublayer_is_named_where_it_sits():
    class Mixer(keras.layers.Layer):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            # One (T, D) matrix per position: a batched einsum.
            self.per_position = keras.layers.EinsumDense(
                "abc,bcd->abd", (T, 3), name="per_position"
            )

        def call(self, x):
            return self.per_position(x)

    inputs = keras.Input((T, D))
    model = keras.Model(inputs, Mixer(name="mixer")(inputs))
    with pytest.raises(registration.UnsupportedLayerError) as error:
        registration.collect_blocks(model)
    message = str(error.value)
    assert "'per_position' (EinsumDense, in 'mixer': kernel axis b of its equation" in message
    assert "unsupported_layers='diagonal'" in message and "register_generic" in message
