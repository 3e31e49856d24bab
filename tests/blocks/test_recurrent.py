"""RecurrentBlock against a re-implementation of each cell: the probe, factors, per-example
gradients, preconditioning, training, and the unroll=False error and diagonal fallback.

The references run SimpleRNN, LSTM and GRU (reset_after=True) step by step in
plain TensorFlow ops written out here (not Keras' cells), anchored on the
layer's own output, with a zero added to each step's pre-activations so that
autodiff through the re-implementation gives g_t = ∂L/∂z_t (for GRU, one
zero on x W + b_x and one on h U + b_h: the block derives the second).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import capture, registration
from kfac_dist.blocks import (
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    KRON,
    DenseBlock,
    GenericDiagonalBlock,
    KroneckerPair,
    RecurrentBlock,
)

B, T, D, U, C = 4, 5, 3, 2, 2
DAMPING = 0.1
GATES = {"simple_rnn": 1, "lstm": 4, "gru": 3}
LAYER = {"simple_rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


def _layer(kind: str, use_bias: bool = True, seed: int = 0, **kwargs) -> keras.layers.Layer:
    """An unroll=True layer with random weights (biases too, so that they matter)."""
    kwargs.setdefault("return_sequences", True)
    layer = LAYER[kind](U, unroll=True, use_bias=use_bias, **kwargs)
    layer.build((None, T, D))
    rng = np.random.default_rng(seed)
    layer.set_weights([0.7 * rng.normal(size=w.shape) for w in layer.get_weights()])
    return layer


def _sigmoid(z: tf.Tensor) -> tf.Tensor:
    return 1.0 / (1.0 + tf.exp(-z))


def _reference(kind: str, weights: list, x: np.ndarray, mask, go_backwards: bool):
    """The cell's forward pass written out, on a tape watching a zero on each z_t.

    Returns (tape, outputs as the layer returns them, x_t, h_{t-1}, probes,
    the pseudo-losses ⟨u_c, outputs⟩): x_t, h_{t-1} and probes indexed by
    time t; probes[t] = (input part, recurrent part), the same tensor for
    SimpleRNN and LSTM (one z_t).
    """
    kernel, recurrent = (tf.convert_to_tensor(w, tf.float64) for w in weights[:2])
    bias = tf.convert_to_tensor(weights[2], tf.float64) if len(weights) == 3 else None
    n = kernel.shape[1]
    xs, hs, probes = {}, {}, {}
    tape = tf.GradientTape(persistent=True)
    with tape:
        h = tf.zeros([B, U], tf.float64)
        c = tf.zeros([B, U], tf.float64)
        previous = tf.zeros([B, U], tf.float64)
        outputs = []
        for t in reversed(range(T)) if go_backwards else range(T):
            x_t = tf.constant(x[:, t])
            eps_x = tf.zeros([B, n], tf.float64)
            eps_h = tf.zeros([B, n], tf.float64) if kind == "gru" else eps_x
            tape.watch([eps_x, eps_h])
            xs[t], hs[t], probes[t] = x_t, h, (eps_x, eps_h)
            zx = x_t @ kernel + eps_x
            if kind == "gru":
                zh = h @ recurrent + eps_h
                if bias is not None:
                    zx, zh = zx + bias[0], zh + bias[1]
                z = _sigmoid(zx[:, :U] + zh[:, :U])
                r = _sigmoid(zx[:, U : 2 * U] + zh[:, U : 2 * U])
                candidate = tf.tanh(zx[:, 2 * U :] + r * zh[:, 2 * U :])
                new_h, new_c = z * h + (1 - z) * candidate, c
            else:
                pre = zx + h @ recurrent + (bias if bias is not None else 0.0)
                if kind == "simple_rnn":
                    new_h, new_c = tf.tanh(pre), c
                else:
                    i, f = _sigmoid(pre[:, :U]), _sigmoid(pre[:, U : 2 * U])
                    new_c = f * c + i * tf.tanh(pre[:, 2 * U : 3 * U])
                    new_h = _sigmoid(pre[:, 3 * U :]) * tf.tanh(new_c)
            out = new_h
            if mask is not None:
                # Keras keeps the previous state (and output) on a padded step.
                keep = tf.constant(mask[:, t : t + 1])
                new_h, new_c = tf.where(keep, new_h, h), tf.where(keep, new_c, c)
                out = tf.where(keep, out, previous)
            h, c, previous = new_h, new_c, out
            outputs.append(out)
        outputs = tf.stack(outputs, axis=1)
        pseudo = [tf.reduce_sum(tf.constant(u) * outputs) for u in _cotangents()]
    return tape, outputs, xs, hs, probes, pseudo


def _cotangents(seed: int = 5) -> np.ndarray:
    """C random output-space vectors: the pseudo-losses ⟨u_c, outputs⟩."""
    return np.random.default_rng(seed).normal(size=(C, B, T, U))


def _reference_statistics(kind, layer, x, mask, go_backwards):
    """NumPy [A_input, G_input, A_recurrent, G_recurrent] from the re-implementation."""
    weights = layer.get_weights()
    tape, outputs, xs, hs, probes, pseudo = _reference(kind, weights, x, mask, go_backwards)
    times = sorted(xs)
    g_x = np.zeros((C, B, T, GATES[kind] * U))
    g_h = np.zeros_like(g_x)
    for col in range(C):
        for t in times:
            gx, gh = tape.gradient(pseudo[col], list(probes[t]))
            g_x[col, :, t], g_h[col, :, t] = gx.numpy(), gh.numpy()
    has_bias = len(weights) == 3
    keep = np.ones((B, T)) if mask is None else mask.astype(float)
    rows_x = np.stack([xs[t].numpy() for t in times], axis=1)  # (B, T, D)
    rows_h = np.stack([hs[t].numpy() for t in times], axis=1)
    if has_bias:
        rows_x = np.concatenate([rows_x, np.ones((B, T, 1))], axis=-1)
        if kind == "gru":
            rows_h = np.concatenate([rows_h, np.ones((B, T, 1))], axis=-1)

    def second_moment(a: np.ndarray) -> np.ndarray:
        return np.einsum("bt,bti,btj->ij", keep, a, a) / B

    def output_moment(g: np.ndarray) -> np.ndarray:
        return np.einsum("cbti,cbtj->ij", g, g) / (B * T)

    expected = [
        second_moment(rows_x),
        output_moment(g_x),
        second_moment(rows_h),
        output_moment(g_h),
    ]
    return outputs.numpy(), expected, (rows_x, rows_h, g_x, g_h)


def _block_statistics(layer, block, x, mask):
    """The block's statistics from one recorded forward pass, gradients at its probe."""
    with tf.GradientTape(persistent=True) as tape:
        with capture.recording([block]) as records:
            out = layer(tf.constant(x), mask=None if mask is None else tf.constant(mask))
        pseudo = [tf.reduce_sum(tf.constant(u) * out) for u in _cotangents()]
    (record,) = records[0]
    grads = tf.stack([tape.gradient(p, record.outputs) for p in pseudo])
    return out, records[0], [grads]


def _data(seed: int = 1, masked: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, D))
    if not masked:
        return x, None
    mask = rng.uniform(size=(B, T)) > 0.35
    mask[:, 1] = True  # every example has a step
    mask[0] = [True, False, True, True, False]  # a gap inside, padding at the end
    return x, mask


CONFIGS = {
    "plain": dict(use_bias=True, masked=False, go_backwards=False),
    "no_bias": dict(use_bias=False, masked=False, go_backwards=False),
    "masked_backwards": dict(use_bias=True, masked=True, go_backwards=True),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(LAYER))
def test_factors_match_the_reimplemented_cell(float64, kind, config):
    options = CONFIGS[config]
    layer = _layer(kind, options["use_bias"], go_backwards=options["go_backwards"])
    block = RecurrentBlock(layer)
    x, mask = _data(masked=options["masked"])
    reference_out, expected, _ = _reference_statistics(
        kind, layer, x, mask, options["go_backwards"]
    )
    out, records, grads = _block_statistics(layer, block, x, mask)
    np.testing.assert_allclose(out.numpy(), reference_out, rtol=1e-12, atol=1e-12)
    factors = block.statistics(records, grads, B)
    assert [tuple(f.shape) for f in factors] == block.factor_shapes()
    assert block.factor_names() == ["A_input", "G_input", "A_recurrent", "G_recurrent"]
    for name, got, want in zip(block.factor_names(), factors, expected):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12, err_msg=name)
    if kind == "gru":
        # The candidate's recurrent gradients are r ⊙ the input part's: a separate G.
        assert not np.allclose(expected[1], expected[3])
    else:
        np.testing.assert_array_equal(factors[1].numpy(), factors[3].numpy())


def test_two_uses_of_a_layer_are_two_records(float64):
    layer = _layer("lstm")
    block = RecurrentBlock(layer)
    (x1, _), (x2, _) = _data(1), _data(2)
    _, first, g1 = _block_statistics(layer, block, x1, None)
    _, second, g2 = _block_statistics(layer, block, x2, None)
    factors = block.statistics(first + second, g1 + g2, 2 * B)
    _, want1, _ = _reference_statistics("lstm", layer, x1, None, False)
    _, want2, _ = _reference_statistics("lstm", layer, x2, None, False)
    for got, a, b in zip(factors, want1, want2):
        np.testing.assert_allclose(got.numpy(), (a + b) / 2, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("approx", [DIAGONAL, FULL])
@pytest.mark.parametrize("kind", list(LAYER))
def test_per_example_statistics_match_autodiff_of_the_reimplementation(float64, kind, approx):
    layer = _layer(kind, go_backwards=kind == "lstm")
    block = RecurrentBlock(layer, approx)
    x, mask = _data(masked=True)
    _, records, grads = _block_statistics(layer, block, x, mask)
    (stat,) = block.statistics(records, grads, B)
    # Each example's gradient of ⟨u_c, outputs⟩ in the re-implementation's weights.
    u = _cotangents()
    per_example = []
    for col in range(C):
        for i in range(B):
            weights = [tf.Variable(w) for w in layer.get_weights()]
            with tf.GradientTape() as tape:
                _, outputs, _, _, _, _ = _reference(
                    kind, [w.value() for w in weights], x, mask, kind == "lstm"
                )
                pseudo = tf.reduce_sum(tf.constant(u[col, i]) * outputs[i])
            grads_i = tape.gradient(pseudo, weights)
            per_example.append(np.concatenate([g.numpy().ravel() for g in grads_i]))
    per_example = np.array(per_example)
    expected = (
        np.sum(per_example**2, axis=0) / B
        if approx == DIAGONAL
        else per_example.T @ per_example / B
    )
    assert tuple(stat.shape) == block.factor_shapes()[0]
    np.testing.assert_allclose(stat.numpy(), expected, rtol=1e-9, atol=1e-12)


# --- the probe ----------------------------------------------------------------


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("kind", list(LAYER))
def test_the_probe_leaves_the_output_bit_identical(kind, config, traced):
    options = CONFIGS[config]
    layer = _layer(kind, options["use_bias"], go_backwards=options["go_backwards"])
    block = RecurrentBlock(layer)
    x, mask = _data(masked=options["masked"])
    x = tf.constant(x, tf.float32)
    mask = None if mask is None else tf.constant(mask)
    cell = layer.cell
    bias = cell.bias

    # The same step but for the recording: its output and the weights' gradients, bit for bit.
    def plain() -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            out = layer(x, mask=mask)
            loss = tf.reduce_sum(out**2)
        return out, tape.gradient(loss, layer.trainable_variables)

    def recorded() -> tuple[tf.Tensor, list[tf.Tensor], tf.Tensor]:
        with tf.GradientTape() as tape:
            with capture.recording([block]) as records:
                out = layer(x, mask=mask)
            loss = tf.reduce_sum(out**2)
        grads = tape.gradient(loss, [*layer.trainable_variables, records[0][0].outputs])
        return out, grads[:-1], grads[-1]

    if traced:
        plain, recorded = tf.function(plain), tf.function(recorded)
    expected, expected_weight_grads = plain()
    out, weight_grads, grads = recorded()
    np.testing.assert_array_equal(out.numpy(), expected.numpy())
    for got, want in zip(weight_grads, expected_weight_grads):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert grads.shape == (B, T, GATES[kind] * U)
    assert np.any(grads.numpy() != 0)
    # The cell is left as it was: no instance attributes, its own bias variable.
    assert "call" not in cell.__dict__ and cell.bias is bias
    assert cell.use_bias is options["use_bias"]


def test_padded_steps_stay_out_of_the_input_factors_and_have_zero_gradients(float64):
    layer = _layer("gru")
    block = RecurrentBlock(layer)
    x, mask = _data(masked=True)
    _, records, grads = _block_statistics(layer, block, x, mask)
    g = grads[0].numpy()  # (C, B, T, 3U)
    assert np.all(g[:, ~mask] == 0) and np.all(np.abs(g[:, mask]).sum(-1) > 0)
    # Changing a padded step's input changes no factor.
    x2 = x.copy()
    x2[~mask] = 100.0
    _, records2, grads2 = _block_statistics(layer, block, x2, mask)
    for a, b in zip(block.statistics(records, grads, B), block.statistics(records2, grads2, B)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["simple_rnn", "lstm"])
def test_recorded_inputs_carry_the_cells_dropout_mask(kind):
    rate = 0.5
    layer = _layer(kind, dropout=rate, recurrent_dropout=rate if kind == "simple_rnn" else 0.0)
    block = RecurrentBlock(layer)
    x = tf.constant(np.random.default_rng(3).normal(size=(B, T, D)) + 5.0, tf.float32)
    with capture.recording([block]) as records:
        layer(x, training=True)
    (record,) = records[0]
    ratio = record.inputs.numpy() / x.numpy()
    # One mask for the whole sequence, entries 0 or 1/(1 - rate), as the cell applies it.
    assert np.all(np.isclose(ratio, 0) | np.isclose(ratio, 1 / (1 - rate)))
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape))
    assert np.any(np.isclose(ratio, 0))


# --- preconditioning -------------------------------------------------------------


def _spd(rng, n: int) -> np.ndarray:
    x = rng.normal(size=(n + 3, n))
    return x.T @ x / (n + 3)


@pytest.mark.parametrize("method", [CHOLESKY, EIGEN])
@pytest.mark.parametrize("kind", list(LAYER))
def test_precondition_solves_each_kronecker_pair(float64, kind, method):
    layer = _layer(kind)
    block = RecurrentBlock(layer)
    assert isinstance(block.approximation, KroneckerPair) and block.approx == KRON
    rng = np.random.default_rng(9)
    shapes = block.factor_shapes()
    factors = [_spd(rng, s[0]) * scale for s, scale in zip(shapes, (3.0, 0.05, 2.0, 0.2))]
    # A float64 λ: tf.cast of a Python float goes through float32.
    damping = tf.constant(DAMPING, tf.float64)
    payloads = []
    for index in range(4):
        payload, retries = block.invert(index, [tf.constant(f) for f in factors], damping, method)
        assert int(retries) == 0
        payloads.append(payload)
    assert [[tuple(p.shape) for p in pay] for pay in payloads] == block.payload_shapes(method)
    grads = [rng.normal(size=v.shape) for v in block.variables]
    update = block.precondition([tf.constant(g) for g in grads], payloads, damping, method)
    kernel, recurrent, bias = grads
    bias = bias.reshape(-1, kernel.shape[1])
    matrices = [np.concatenate([kernel, bias[:1]]), recurrent]
    if kind == "gru":
        matrices[1] = np.concatenate([recurrent, bias[1:]])

    def solve(a: np.ndarray, g: np.ndarray, m: np.ndarray) -> np.ndarray:
        if method == EIGEN:
            system = np.kron(a, g) + DAMPING * np.eye(a.shape[0] * g.shape[0])
            return np.linalg.solve(system, m.reshape(-1)).reshape(m.shape)
        pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
        root = np.sqrt(DAMPING)
        left = np.linalg.inv(a + pi * root * np.eye(a.shape[0]))
        return left @ m @ np.linalg.inv(g + root / pi * np.eye(g.shape[0]))

    solved_input = solve(factors[0], factors[1], matrices[0])
    solved_recurrent = solve(factors[2], factors[3], matrices[1])
    expected_bias = [solved_input[-1:]] + ([solved_recurrent[-1:]] if kind == "gru" else [])
    expected = [
        solved_input[:-1],
        solved_recurrent[:-1] if kind == "gru" else solved_recurrent,
        np.concatenate(expected_bias).reshape(grads[2].shape),
    ]
    for got, want, variable in zip(update, expected, block.variables):
        assert tuple(got.shape) == tuple(variable.shape)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


def test_approximations_are_validated():
    layer = _layer("lstm")
    assert RecurrentBlock(layer).approx == KRON
    with pytest.raises(ValueError, match="fisher_approx"):
        RecurrentBlock(layer, "bogus")


# --- registration and training -----------------------------------------------------

N, VOCAB = 32, 7


def _classifier(kind: str, unroll: bool, masking: bool = False) -> keras.Model:
    """(N, T, D) sequences (or tokens with mask_zero) → recurrent layer → Dense(2) logits."""
    keras.utils.set_random_seed(0)
    if masking:
        inputs = keras.Input((T,), dtype="int32")
        h = keras.layers.Embedding(VOCAB, D, mask_zero=True, name="embedding")(inputs)
    else:
        inputs = keras.Input((T, D))
        h = inputs
    if kind == "bidirectional":
        rnn = keras.layers.Bidirectional(keras.layers.LSTM(U, unroll=unroll), name="bidirectional")
    else:
        rnn = LAYER[kind](U, unroll=unroll, name=kind)
    outputs = keras.layers.Dense(2, name="head")(rnn(h))
    return keras.Model(inputs, outputs)


def _classification_data(masking: bool = False):
    rng = np.random.default_rng(0)
    if masking:
        lengths = rng.integers(2, T + 1, size=N)
        x = rng.integers(1, VOCAB, size=(N, T))
        x[np.arange(T)[None] >= lengths[:, None]] = 0
        y = (np.where(x > 0, x, 0).sum(1) / lengths > VOCAB / 2).astype("int32")
        return x.astype("int32"), y
    x = rng.normal(size=(N, T, D)).astype("float32")
    return x, (x[:, :, 0].mean(1) > 0).astype("int32")


def _fit_five_steps(model: keras.Model, data, **kfac_args) -> tuple[list[float], kfac.Kfac]:
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    args = dict(
        learning_rate=0.1,
        damping=0.1,
        momentum=0.5,
        model=model,
        loss=loss,
        invert_every=1,
        seed=0,
    )
    args.update(kfac_args)
    optimizer = kfac.Kfac(**args)
    model.compile(optimizer=optimizer, loss=loss)
    x, y = data
    history = model.fit(x, y, batch_size=N, epochs=5, verbose=0, shuffle=False)
    return history.history["loss"], optimizer


KINDS = [*LAYER, "bidirectional"]


@pytest.mark.parametrize(
    "kind, masking, approx",
    [(k, False, None) for k in KINDS] + [("lstm", True, None), ("gru", False, DIAGONAL)],
)
def test_unrolled_layers_get_recurrent_blocks_and_train(kind, masking, approx):
    model = _classifier(kind, unroll=True, masking=masking)
    blocks = registration.collect_blocks(model, unsupported_layers="error")
    recurrent = [b for b in blocks if isinstance(b, RecurrentBlock)]
    assert len(recurrent) == (2 if kind == "bidirectional" else 1)
    assert not any(isinstance(b, GenericDiagonalBlock) for b in blocks)
    registered = [v.path for b in blocks for v in b.variables]
    assert sorted(registered) == sorted(v.path for v in model.trainable_variables)
    fisher_approx = None if approx is None else {kind: approx}
    losses, optimizer = _fit_five_steps(
        model,
        _classification_data(masking),
        unsupported_layers="error",
        fisher_approx=fisher_approx,
    )
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    kinds = {type(b.approximation).__name__ for b in optimizer.curvature.blocks}
    assert ("KroneckerPair" in kinds) == (approx is None)


@pytest.mark.parametrize("kind", KINDS)
def test_unroll_false_is_an_error_that_says_what_to_do(kind):
    model = _classifier(kind, unroll=False)
    with pytest.raises(registration.UnsupportedLayerError) as error:
        registration.collect_blocks(model, unsupported_layers="error")
    message = str(error.value)
    cell = {"simple_rnn": "simple_rnn_cell", "lstm": "lstm_cell", "gru": "gru_cell"}
    for name in ["lstm_cell"] * 2 if kind == "bidirectional" else [cell[kind]]:
        assert f"'{name}'" in message
    assert "unroll=False" in message and "pass unroll=True" in message
    assert "unsupported_layers='diagonal'" in message and "register_generic" in message
    assert message.count("tf.while_loop") == (2 if kind == "bidirectional" else 1)


@pytest.mark.parametrize("kind", KINDS)
def test_unroll_false_trains_with_the_diagonal_fallback(kind):
    model = _classifier(kind, unroll=False)
    with pytest.warns(UserWarning, match="diagonal block"):
        losses, optimizer = _fit_five_steps(
            model, _classification_data(), unsupported_layers="diagonal"
        )
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    kinds = {type(b) for b in optimizer.curvature.blocks}
    assert kinds == {GenericDiagonalBlock, DenseBlock}


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda: keras.layers.LSTM(U, unroll=True, recurrent_dropout=0.1), "implementation=1"),
        (lambda: keras.layers.GRU(U, unroll=True, implementation=1), "implementation=1"),
        (lambda: keras.layers.GRU(U, unroll=True, reset_after=False), "reset_after=False"),
    ],
)
def test_configurations_without_one_input_factor_are_named(make, reason):
    layer = make()
    layer.build((None, T, D))
    assert registration._block_for(layer, None) is None  # noqa: SLF001
    with pytest.raises(registration.UnsupportedLayerError, match=reason):
        kfac.LayerCollection().register_layer(layer)
    with pytest.raises(ValueError, match=reason):
        RecurrentBlock(layer)


def test_factors_under_mirrored_strategy_match_one_replica():
    """Capture runs in each replica: the folded factors are the global batch's."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(16, T, D)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")

    def factors(strategy: tf.distribute.Strategy) -> list[np.ndarray]:
        with strategy.scope():
            keras.utils.set_random_seed(3)
            inputs = keras.Input((T, D))
            h = keras.layers.LSTM(U, unroll=True, name="lstm")(inputs)
            model = keras.Model(inputs, keras.layers.Dense(2, name="head")(h))
            optimizer = kfac.Kfac(
                learning_rate=0.01,
                damping=0.1,
                model=model,
                loss="mse",
                estimation_mode="exact",
                cov_ema_decay=0.0,
                invert_every=1,
                unsupported_layers="error",
            )
            model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        return [f.numpy() for f in optimizer.curvature.factors()]

    one = factors(tf.distribute.get_strategy())
    two = factors(
        tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
    )
    assert len(one) == 6  # the LSTM's four, the head's two
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
