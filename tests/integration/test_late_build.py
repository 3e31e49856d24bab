"""Models that create their variables late train with K-FAC as they do with Adam.

A subclassed model, a `Sequential` without an `Input`, a model built with
`model.build(shape)` and a model with a `Lambda` layer (no `output_shape`)
have no variables when `Kfac(model=...)` binds to them: K-FAC registers their
layers once they are built, at the start of `fit`, on one device and under
MirroredStrategy.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac


class TwoLayer(keras.Model):
    """A subclassed model: its layers build on the first call."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, inputs):
        return self.head(self.hidden(inputs))


def _model(style: str) -> keras.Model:
    if style == "subclassed":
        return TwoLayer()
    if style == "sequential_without_input":
        return keras.Sequential(
            [keras.layers.Dense(8, activation="tanh", name="hidden"), keras.layers.Dense(2)]
        )
    if style == "built_with_shape":
        model = TwoLayer()
        with pytest.warns(UserWarning, match="build"):  # Keras: no build() of its own
            model.build((None, 6))
        return model
    return keras.Sequential(
        [
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Lambda(lambda t: 2.0 * tf.nn.l2_normalize(t, axis=-1)),
            keras.layers.Dense(2, name="head"),
        ]
    )


STYLES = ["subclassed", "sequential_without_input", "built_with_shape", "lambda"]


@pytest.mark.parametrize("replicas", [1, 2])
@pytest.mark.parametrize("style", STYLES)
def test_late_built_model_registers_its_layers_and_trains_with_fit(style, replicas):
    # One device is the default strategy, where Keras defers building to the
    # first traced step; MirroredStrategy builds symbolically before it.
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
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    y = np.stack([np.tanh(x[:, 0] + x[:, 1]), x[:, 2] - x[:, 3]], axis=1).astype(np.float32)
    with strategy.scope():
        model = _model(style)
        assert not model.trainable_variables or style == "built_with_shape"
        opt = kfac.Kfac(
            learning_rate=0.1, damping=0.1, model=model, loss="mse", invert_every=2, seed=0
        )
        model.compile(optimizer=opt, loss="mse")
    history = model.fit(x, y, batch_size=32, epochs=5, verbose=0, shuffle=False)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0]
    dense = [v for v in model.trainable_variables if v.path.endswith("kernel")]
    assert len(dense) == 2
    blocks = opt.curvature.blocks
    assert len(blocks) == 2 and all(b.num_params > 0 for b in blocks)
    assert {id(v) for b in blocks for v in b.variables} == {
        id(v) for v in model.trainable_variables
    }
    assert int(opt.curvature.inversions.numpy()) > 0
    inverse = opt.curvature.payloads[0][0].numpy()
    assert np.all(np.isfinite(inverse)) and np.abs(inverse).max() > 0


def test_building_kfac_before_the_model_has_variables_says_what_to_do():
    model = TwoLayer()
    opt = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, loss="mse")
    with pytest.raises(ValueError, match="has no variables yet.*model\\(x\\)"):
        opt.build(model.trainable_variables)
