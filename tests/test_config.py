"""Tests of `KfacConfig`: every argument checked once, and the defaults it resolves to."""

import dataclasses

import keras
import pytest

import kfac_dist as kfac
from kfac_dist.config import KfacConfig


def test_adaptive_resolves_to_quadratic_model_momentum_with_adaptive_damping():
    config = KfacConfig(damping=0.1, adaptive=True)
    assert config.momentum_type == "qmodel"
    assert config.adapt_damping and config.uses_qmodel
    # The quadratic model chooses the step size, the momentum and (adaptively) the damping.
    assert config.mutable == ()
    assert not config.clips_kl


def test_regular_defaults_and_what_may_change_during_training():
    config = KfacConfig(learning_rate=0.01, damping=0.1, norm_constraint=0.5)
    assert config.momentum == 0.9 and config.momentum_type == "regular"
    assert config.mutable == ("learning_rate", "damping", "momentum", "norm_constraint")
    assert config.clips_kl and not config.coupled_weight_decay


def test_weight_decay_is_coupled_only_with_the_quadratic_model():
    regular = KfacConfig(learning_rate=0.01, damping=0.1, weight_decay_coeff=1e-4)
    qmodel = KfacConfig(damping=0.1, adaptive=True, weight_decay_coeff=1e-4)
    assert not regular.coupled_weight_decay and qmodel.coupled_weight_decay


@pytest.mark.parametrize(
    "arguments, named",
    [
        ({"learning_rate": 0.1}, "damping"),
        ({"damping": 0.1}, "learning_rate"),
        ({"learning_rate": -1.0, "damping": 0.1}, "learning_rate"),
        ({"learning_rate": 0.1, "damping": 0.0}, "damping"),
        ({"learning_rate": 0.1, "damping": 0.1, "momentum": 1.0}, "momentum"),
        ({"learning_rate": 0.1, "damping": 0.1, "norm_constraint": 0.0}, "norm_constraint"),
        ({"learning_rate": 0.1, "damping": 0.1, "cov_ema_decay": 1.0}, "cov_ema_decay"),
        ({"learning_rate": 0.1, "damping": 0.1, "invert_every": 0}, "invert_every"),
        ({"learning_rate": 0.1, "damping": 0.1, "estimation_mode": "x"}, "estimation_mode"),
        ({"learning_rate": 0.1, "damping": 0.1, "inverse_method": "qr"}, "inverse_method"),
        ({"learning_rate": 0.1, "damping": 0.1, "factor_sync": "never"}, "factor_sync"),
        ({"learning_rate": 0.1, "damping": 0.1, "inverse_sharing": "x"}, "inverse_sharing"),
        ({"learning_rate": 0.1, "damping": 0.1, "collective_timeout": 0}, "collective_timeout"),
        ({"learning_rate": 0.1, "damping": 0.1, "max_factor_dim": 0}, "max_factor_dim"),
        ({"learning_rate": 0.1, "damping": 0.1, "max_factor_dim": 2.5}, "max_factor_dim"),
        ({"learning_rate": 0.1, "damping": 0.1, "max_factor_dim": True}, "max_factor_dim"),
        (
            {"learning_rate": 0.1, "damping": 0.1, "gradient_accumulation_steps": 1},
            "gradient_accumulation_steps",
        ),
        ({"learning_rate": 0.1, "damping": 0.1, "adaptive": True}, "learning_rate"),
        ({"damping": 0.1, "adaptive": True, "norm_constraint": 1.0}, "norm_constraint"),
        ({"damping": 0.1, "adaptive": True, "momentum": 0.5}, "momentum"),
        ({"learning_rate": 0.1, "damping": 0.1, "adapt_damping": True}, "adapt_damping"),
        (
            {"damping": 0.1, "adaptive": True, "gradient_accumulation_steps": 2},
            "gradient_accumulation_steps",
        ),
    ],
)
def test_each_invalid_argument_is_named_in_the_error(arguments, named):
    with pytest.raises(ValueError, match=named):
        KfacConfig(**arguments)


def test_max_factor_dim_defaults_to_the_measured_bound_and_takes_numpy_ints():
    import numpy as np

    from kfac_dist.options import DEFAULT_MAX_FACTOR_DIM

    assert KfacConfig(learning_rate=0.1, damping=0.1).max_factor_dim == DEFAULT_MAX_FACTOR_DIM
    bound = KfacConfig(learning_rate=0.1, damping=0.1, max_factor_dim=np.int64(300))
    assert bound.max_factor_dim == 300 and type(bound.max_factor_dim) is int


def test_config_is_frozen():
    config = KfacConfig(learning_rate=0.1, damping=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.damping = 1.0  # type: ignore[misc]


def test_kfac_names_an_unknown_argument():
    with pytest.raises(TypeError, match="dampening"):
        kfac.Kfac(learning_rate=0.1, damping=0.1, dampening=0.5)


@pytest.mark.parametrize(
    "arguments",
    [
        {"damping": 0.1, "adaptive": True, "weight_decay_coeff": 1e-4},
        {"damping": 0.1, "momentum_type": "qmodel_fixedmu", "momentum": 0.5},
        {
            "learning_rate": keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5),
            "damping": 0.01,
            "norm_constraint": 0.3,
            "inverse_method": "eigen",
            "gradient_accumulation_steps": 2,
            "max_factor_dim": 512,
        },
        {"learning_rate": 0.1, "damping": 0.1, "max_factor_dim": None},
    ],
)
def test_get_config_round_trips_every_mode(arguments):
    optimizer = kfac.Kfac(**arguments)
    rebuilt = kfac.Kfac.from_config(optimizer.get_config())
    assert rebuilt.config.arguments().keys() == optimizer.config.arguments().keys()
    for name, value in optimizer.config.arguments().items():
        if name in ("learning_rate", "seed"):
            continue
        expected = pytest.approx(value, rel=1e-6) if isinstance(value, float) else value
        # Hyperparameters round-trip through their float32 variables.
        assert getattr(rebuilt.config, name) == expected, name
    assert int(rebuilt.seed.numpy()) == int(optimizer.seed.numpy())
    assert rebuilt.config.mutable == optimizer.config.mutable
