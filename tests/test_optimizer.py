"""Kfac end to end on one replica: closed-form cases, the update rule, bad input."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 4)).astype("float32")
Y = RNG.normal(size=(32, 3)).astype("float32")


def dense_model(seed=0, units=3, inputs=4, activation=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [keras.Input((inputs,)), keras.layers.Dense(units, activation=activation)]
    )


def exact_kfac(model, **overrides):
    args = dict(
        learning_rate=1.0,
        damping=1e-8,
        momentum=0.0,
        model=model,
        loss="mse",
        estimation_mode="exact",
        inverse_method="eigen",
        cov_ema_decay=0.0,
        invert_every=1,
    )
    args.update(overrides)
    return kfac.Kfac(**args)


def kernel_and_bias(model):
    layer = model.layers[0]
    return np.concatenate([layer.kernel.numpy(), layer.bias.numpy()[None]], 0)


def least_squares(x, y):
    design = np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)
    return np.linalg.lstsq(design.astype("float64"), y.astype("float64"), rcond=None)[0]


def test_one_exact_step_reaches_least_squares_float32():
    model = dense_model()
    model.compile(optimizer=exact_kfac(model), loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    solution = least_squares(X, Y)
    np.testing.assert_allclose(
        kernel_and_bias(model), solution, rtol=1e-3, atol=1e-3 * np.abs(solution).max()
    )


def test_one_exact_step_reaches_least_squares_float64():
    # set_floatx alone does not reset a global dtype policy already in use.
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        model = dense_model()
        model.compile(optimizer=exact_kfac(model), loss="mse")
        model.fit(
            X.astype("float64"),
            Y.astype("float64"),
            batch_size=32,
            epochs=1,
            verbose=0,
            shuffle=False,
        )
        solution = least_squares(X, Y)
        assert model.layers[0].kernel.dtype == "float64"
        np.testing.assert_allclose(
            kernel_and_bias(model), solution, rtol=1e-6, atol=1e-6 * np.abs(solution).max()
        )
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def test_cholesky_with_tiny_damping_also_reaches_least_squares():
    model = dense_model()
    model.compile(optimizer=exact_kfac(model, inverse_method="cholesky", damping=1e-12), loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    solution = least_squares(X, Y)
    np.testing.assert_allclose(
        kernel_and_bias(model), solution, rtol=1e-3, atol=1e-3 * np.abs(solution).max()
    )


def test_update_unchanged_when_loss_and_damping_scale_together():
    updates = []
    for c in (1.0, 7.0):
        model = dense_model(activation="tanh")
        before = kernel_and_bias(model)
        opt = exact_kfac(model, damping=0.1 * c, loss_weights=[c], learning_rate=0.5)
        model.compile(optimizer=opt, loss="mse", loss_weights=[c])
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
        updates.append(kernel_and_bias(model) - before)
    np.testing.assert_allclose(updates[0], updates[1], rtol=1e-4, atol=1e-6)


def _one_step_update(**overrides):
    model = dense_model(activation="tanh")
    before = kernel_and_bias(model)
    model.compile(optimizer=exact_kfac(model, **overrides), loss="mse")
    history = model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    return model, before, kernel_and_bias(model) - before, history


def test_kl_clipping_scales_update_by_formula():
    lr, bound = 0.5, 1e-4
    _, before, free, _ = _one_step_update(learning_rate=lr, damping=0.1)
    _, _, clipped, history = _one_step_update(learning_rate=lr, damping=0.1, norm_constraint=bound)
    # free = -lr·P∇, so ⟨P∇, ∇⟩ needs ∇: recover it from the exact model gradient.
    model = dense_model(activation="tanh")
    with tf.GradientTape() as tape:
        loss = keras.losses.MeanSquaredError()(Y, model(X))
    grads = tape.gradient(loss, model.trainable_variables)
    grad = np.concatenate([grads[0].numpy(), grads[1].numpy()[None]], 0)
    inner = np.sum((-free / lr) * grad)
    expected = min(1.0, np.sqrt(bound / (lr**2 * inner)))
    assert expected < 1.0
    np.testing.assert_allclose(clipped, expected * free, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(history.history["kl_clip"][0], expected, rtol=1e-4)


def test_weight_decay_is_added_to_the_update():
    lr, coeff = 0.5, 0.1
    _, before, free, _ = _one_step_update(learning_rate=lr, damping=0.1)
    _, _, decayed, _ = _one_step_update(learning_rate=lr, damping=0.1, weight_decay_coeff=coeff)
    np.testing.assert_allclose(decayed, free - lr * coeff * before, rtol=1e-4, atol=1e-7)


def test_momentum_accumulates_velocity():
    lr, mu = 0.1, 0.9
    model = dense_model(activation="tanh")
    opt = exact_kfac(model, learning_rate=lr, damping=0.1, momentum=mu)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    v1 = opt.state.velocities[0].numpy().copy()
    w1 = model.layers[0].kernel.numpy().copy()
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    w2 = model.layers[0].kernel.numpy()
    v2 = opt.state.velocities[0].numpy()
    np.testing.assert_allclose(w2 - w1, v2, rtol=1e-5, atol=1e-8)
    # v2 = μ v1 − lr·P∇₂: the momentum part is exactly μ v1.
    assert not np.allclose(v2, mu * v1)
    np.testing.assert_allclose(
        v1, w1 - dense_model(activation="tanh").layers[0].kernel.numpy(), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (dict(damping=-1.0), "damping must be > 0"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(invert_every=0), "invert_every must be >= 1"),
        (dict(cov_ema_decay=1.0), "cov_ema_decay must be in [0, 1)"),
        (dict(estimation_mode="mc"), "estimation_mode must be one of"),
        (dict(inverse_method="svd"), "inverse_method must be one of"),
        (dict(momentum=1.5), "momentum must be in [0, 1)"),
        (dict(clipnorm=1.0), "norm_constraint"),
        (dict(global_clipnorm=1.0), "norm_constraint"),
        (dict(use_ema=True), "use_ema"),
        (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps must be >= 2"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(overrides, fragment):
    args = dict(learning_rate=0.1, damping=0.01, model=dense_model(), loss="mse")
    args.update(overrides)
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace(")", r"\)")):
        kfac.Kfac(**args)


def test_missing_damping_and_positional_arguments_raise():
    with pytest.raises(ValueError, match="damping"):
        kfac.Kfac(learning_rate=0.1, model=dense_model(), loss="mse")
    with pytest.raises(TypeError, match="keyword arguments only"):
        kfac.Kfac(0.1, 0.01)


def test_loss_weights_must_match_outputs():
    model = dense_model()
    opt = kfac.Kfac(
        learning_rate=0.1, damping=0.01, model=model, loss="mse", loss_weights=[1.0, 2.0]
    )
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match="loss_weights"):
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0)


def test_loss_given_to_both_and_different_raises():
    model = dense_model()
    opt = kfac.Kfac(learning_rate=0.1, damping=0.01, model=model, loss="mse")
    model.compile(optimizer=opt, loss="binary_crossentropy")
    with pytest.raises(ValueError, match="differs from the loss the model was compiled with"):
        model.fit(X, Y, batch_size=32, epochs=1, verbose=0)


def test_mutable_hyperparameters_follow_construction():
    opt = kfac.Kfac(
        learning_rate=0.1, damping=0.01, model=dense_model(), loss="mse", norm_constraint=0.01
    )
    assert set(opt.mutable_hyperparameters) == {
        "learning_rate",
        "damping",
        "momentum",
        "norm_constraint",
    }
    opt.damping = 0.5
    assert float(opt.damping.numpy()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="weight_decay_coeff cannot change"):
        opt.weight_decay_coeff = 0.1


def test_learning_rate_scheduler_callback_changes_the_rate():
    model = dense_model()
    opt = kfac.Kfac(learning_rate=0.1, damping=0.01, model=model, loss="mse")
    model.compile(optimizer=opt, loss="mse")
    seen = []
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 0.1 / (epoch + 1))
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda e, logs: seen.append(float(opt.learning_rate.numpy()))
    )
    model.fit(X, Y, batch_size=16, epochs=3, verbose=0, callbacks=[schedule, record])
    np.testing.assert_allclose(seen, [0.1, 0.05, 0.1 / 3], rtol=1e-6)


def test_nonfinite_batch_leaves_weights_factors_and_inverses_and_is_counted():
    model = dense_model(activation="tanh")
    opt = exact_kfac(model, learning_rate=0.1, damping=0.1, invert_every=1, cov_ema_decay=0.5)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    state = [v.numpy().copy() for v in model.trainable_variables + opt.variables]
    bad = X.copy()
    bad[3, 1] = np.nan
    history = model.fit(bad, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    after = [v.numpy() for v in model.trainable_variables + opt.variables]
    changed = [
        v.path
        for v, a, b in zip(model.trainable_variables + opt.variables, state, after)
        if not np.array_equal(a, b)
        and not any(k in v.path for k in ("iteration", "skipped", "kl_clip", "inversions_computed"))
    ]
    assert changed == []
    assert history.history["nonfinite_skips"][0] >= 1
    # Training goes on from the good state.
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert np.all(np.isfinite(model.layers[0].kernel.numpy()))


def test_sample_weights_weight_the_curvature_one_step_reaches_weighted_least_squares():
    weights = RNG.uniform(0.0, 3.0, size=32).astype("float32")
    model = dense_model()
    model.compile(optimizer=exact_kfac(model), loss="mse")
    model.fit(X, Y, sample_weight=weights, batch_size=32, epochs=1, verbose=0, shuffle=False)
    design = np.concatenate([X, np.ones((32, 1), "float32")], 1).astype("float64")
    root = np.sqrt(weights.astype("float64"))[:, None]
    solution = np.linalg.lstsq(design * root, Y.astype("float64") * root, rcond=None)[0]
    np.testing.assert_allclose(
        kernel_and_bias(model), solution, rtol=1e-3, atol=1e-3 * np.abs(solution).max()
    )


def test_class_weight_is_the_sample_weight_of_each_label():
    labels = RNG.integers(0, 3, size=32)
    class_weight = {0: 0.5, 1: 2.0, 2: 1.0}
    results = []
    for kwargs in (
        dict(class_weight=class_weight),
        dict(sample_weight=np.array([class_weight[c] for c in labels], "float32")),
    ):
        model = dense_model(activation="softmax")
        opt = exact_kfac(
            model, loss="sparse_categorical_crossentropy", learning_rate=0.5, damping=0.1
        )
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
        model.fit(X, labels, batch_size=16, epochs=2, verbose=0, shuffle=False, **kwargs)
        results.append(model.get_weights() + [v.numpy() for v in opt.curvature.factor_sums])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_batch_size_mismatch_with_the_data_is_an_error():
    model = dense_model()
    opt = kfac.Kfac(learning_rate=0.1, damping=0.01, model=model, loss="mse", batch_size=16)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)  # matches: fine
    with pytest.raises(tf.errors.InvalidArgumentError, match="batch_size"):
        model.fit(X, Y, batch_size=8, epochs=1, verbose=0)


def test_metrics_validation_evaluate_predict_and_callbacks_work():
    model = dense_model(activation="softmax")
    labels = RNG.integers(0, 3, size=32)
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model)
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=100)
    history = model.fit(
        X, labels, batch_size=8, epochs=2, validation_data=(X, labels), callbacks=[stop], verbose=0
    )
    assert {"accuracy", "val_loss", "val_accuracy", "damping", "kl_clip"} <= set(history.history)
    loss, accuracy = model.evaluate(X, labels, verbose=0)
    np.testing.assert_allclose(loss, history.history["val_loss"][-1], rtol=1e-5)
    assert model.predict(X, verbose=0).shape == (32, 3)


def test_kfac_state_appears_in_tensorboard(tmp_path):
    from tensorflow.core.util import event_pb2

    model = dense_model(activation="tanh")
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse", norm_constraint=0.01)
    model.compile(optimizer=opt, loss="mse")
    board = keras.callbacks.TensorBoard(log_dir=str(tmp_path))
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0, callbacks=[board])
    tags = set()
    for path in tmp_path.rglob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(path)):
            event = event_pb2.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    assert {"epoch_damping", "epoch_kl_clip", "epoch_learning_rate"} <= tags, tags


@pytest.mark.parametrize("metrics", [[], ["mae"]])
def test_train_on_batch_returns_what_it_returns_with_adam(metrics):
    returned = {}
    for name in ("adam", "kfac"):
        model = dense_model(activation="tanh")
        if name == "adam":
            opt = keras.optimizers.Adam(0.01)
        else:
            opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")
        model.compile(optimizer=opt, loss="mse", metrics=metrics)
        returned[name] = (
            model.train_on_batch(X, Y),
            model.train_on_batch(X, Y, return_dict=True),
        )
    (adam_flat, adam_dict), (kfac_flat, kfac_dict) = returned["adam"], returned["kfac"]
    if not metrics:
        assert isinstance(kfac_flat, float) and isinstance(adam_flat, float)
    else:
        assert isinstance(kfac_flat, list) and len(kfac_flat) == len(adam_flat) == 2
    assert set(kfac_dict) == set(adam_dict) | {"damping", "kl_clip", "nonfinite_skips"}
    np.testing.assert_allclose(kfac_dict["damping"], 0.1, rtol=1e-6)
    assert kfac_dict["nonfinite_skips"] == 0.0
