"""A factor with no well-conditioned damped inverse keeps the previous inverse, counted."""

import keras
import numpy as np
import tensorflow as tf

import kfac_dist as kfac

RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 4)).astype("float32")
Y = RNG.normal(size=(32, 3)).astype("float32")


def test_factor_with_no_well_conditioned_retry_keeps_the_previous_inverse():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    opt = kfac.Kfac(
        learning_rate=0.1, damping=1.0, model=model, loss="mse", invert_every=1, momentum=0.0
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=32, epochs=1, verbose=0)
    curvature = opt.curvature
    before = [[v.numpy().copy() for v in payload] for payload in curvature.payloads]
    assert int(curvature.inversion_failures.numpy()) == 0
    # A's sum gets an eigenvalue −1e12: no retry's damping makes A + dI positive
    # definite, and a rounding "success" would be ill-conditioned.
    sums = curvature.factor_sums[0]
    sums.assign(np.diag([-1e12, 1.0, 1.0, 1.0, 1.0]).astype("float32") * 32)
    tf.function(lambda: curvature.update_inverses(opt.damping_value()), autograph=False)()
    after = [[v.numpy() for v in payload] for payload in curvature.payloads]
    np.testing.assert_array_equal(after[0][0], before[0][0])  # A's inverse kept
    assert int(curvature.inversion_failures.numpy()) == 1
    assert np.all(np.isfinite(after[0][0]))
