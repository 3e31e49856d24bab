"""Every option of Kfac trains in float64 (keras.config.set_floatx("float64"))."""

import keras
import numpy as np
import pytest

import kfac_dist as kfac

OPTIONS = {
    "kl_clip": dict(learning_rate=0.1, norm_constraint=0.01),
    "weight_decay_eigen": dict(learning_rate=0.1, weight_decay_coeff=0.01, inverse_method="eigen"),
    "exact_full": dict(learning_rate=0.1, estimation_mode="exact", fisher_approx="full"),
    "empirical_diagonal": dict(
        learning_rate=0.1, estimation_mode="empirical", fisher_approx="diagonal"
    ),
    "every_update_balanced": dict(
        learning_rate=0.1, factor_sync="every_update", placement="balanced", cov_update_every=2
    ),
    "schedule_momentum": dict(
        learning_rate=keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5), momentum=0.5
    ),
    "adaptive": dict(adaptive=True, damping_adaptation_interval=2),
    "qmodel_fixedmu_decay": dict(
        momentum_type="qmodel_fixedmu", momentum=0.5, weight_decay_coeff=0.01
    ),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_option_trains_in_float64(name):
    previous = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(64, 5))
        y = rng.integers(0, 3, size=64)
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((5,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(3),
            ]
        )
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        opt = kfac.Kfac(damping=0.1, model=model, loss=loss, invert_every=2, **OPTIONS[name])
        model.compile(optimizer=opt, loss=loss)
        history = model.fit(x, y, batch_size=16, epochs=3, verbose=0)
    finally:
        keras.config.set_floatx(previous[0])
        keras.config.set_dtype_policy(previous[1])
    losses = history.history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    assert all(v.dtype == "float64" for v in opt.curvature.factor_sums)
    assert model.layers[0].kernel.dtype == "float64"
