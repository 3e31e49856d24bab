"""A model with its own `train_step`: K-FAC never replaces it silently.

Unmarked, binding fails saying why and what to do; marked with
`calls_kfac_step`, the user's step runs and calls K-FAC's step itself.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac

RNG = np.random.default_rng(0)
X = RNG.normal(size=(128, 4)).astype(np.float32)
Y = (X @ RNG.normal(size=(4, 2))).astype(np.float32)


class OwnStep(keras.Model):
    """A subclassed model whose train_step does its own work around the update."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
        self.head = keras.layers.Dense(2, name="head")
        self.steps_seen = keras.Variable(0, dtype="int64", trainable=False, name="steps_seen")

    def call(self, inputs):
        return self.head(self.hidden(inputs))

    def train_step(self, data):
        self.steps_seen.assign_add(1)
        return super().train_step(data)


class ComposedStep(OwnStep):
    """Trains on targets it rescales itself, through K-FAC's step."""

    @kfac.calls_kfac_step
    def train_step(self, data):
        x, y = data
        self.steps_seen.assign_add(1)
        logs = kfac.kfac_train_step(self, (x, -3.0 * y))
        return {**logs, "steps_seen": tf.cast(self.steps_seen.value, tf.float32)}


def test_a_class_train_step_is_refused_at_binding_with_what_to_do():
    model = OwnStep()
    with pytest.raises(ValueError, match="OwnStep.*own train_step.*calls_kfac_step"):
        kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")
    assert "train_step" not in vars(model)  # the user's step is left in place


def test_a_train_step_assigned_to_the_instance_is_refused_at_binding():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    keras_step = model.train_step
    model.train_step = lambda data: keras_step(data)
    with pytest.raises(ValueError, match="own train_step"):
        kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_marked_train_step_runs_and_composes_with_kfac(replicas):
    strategy = (
        tf.distribute.get_strategy()
        if replicas == 1
        else tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(replicas)],
            # The strategy's own collectives use group key 1 for any device
            # set: tests of one process share it only through this path.
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    )
    with strategy.scope():
        model = ComposedStep()
        opt = kfac.Kfac(learning_rate=0.2, damping=0.1, model=model, loss="mse", invert_every=2)
        model.compile(optimizer=opt, loss="mse")
    history = model.fit(X, Y, batch_size=32, epochs=10, verbose=0, shuffle=False)
    assert int(model.steps_seen.numpy()) == 10 * 4  # the user's code ran every step
    assert history.history["steps_seen"][-1] == 40.0
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    # It trained on the targets the user's step made, not the raw ones.
    pred = model.predict(X, verbose=0)
    assert np.mean((pred + 3.0 * Y) ** 2) < np.mean((pred - Y) ** 2)
    assert len(opt.curvature.blocks) == 2 and int(opt.curvature.inversions.numpy()) > 0


def test_a_marked_train_step_falls_back_to_keras_with_another_optimizer():
    model = ComposedStep()
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    history = model.fit(X, Y, batch_size=32, epochs=3, verbose=0, shuffle=False)
    assert int(model.steps_seen.numpy()) == 12
    assert history.history["loss"][-1] < history.history["loss"][0]
