"""A step retraced for an uneven last batch (unknown batch size) still runs.

A Dense on a sequence then gets its kernel gradient with an unknown static
shape from TensorFlow's matmul gradient; K-FAC's update used to fail at
trace time ("unsupported operand type(s) for *: 'NoneType' and 'int'").
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac

TOKENS = np.random.default_rng(0).integers(0, 20, size=(20, 6))  # batches of 8, 8, 4
LABELS = TOKENS[:, 0] % 3


def sequence_model() -> keras.Model:
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,), dtype="int32"),
            keras.layers.Embedding(20, 4),
            keras.layers.Dense(8, activation="tanh"),  # on (batch, 6, 4)
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(3),
        ]
    )


@pytest.mark.parametrize("replicas", [1, 2])
def test_an_uneven_last_batch_retraces_and_trains(replicas):
    strategy = (
        tf.distribute.MirroredStrategy(
            ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
        )
        if replicas == 2
        else tf.distribute.get_strategy()
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with strategy.scope():
        model = sequence_model()
        opt = kfac.Kfac(
            learning_rate=0.1,
            damping=0.1,
            norm_constraint=0.01,
            model=model,
            loss=loss,
            invert_every=2,
        )
        model.compile(optimizer=opt, loss=loss)
    before = model.get_weights()
    model.fit(TOKENS, LABELS, batch_size=8, epochs=2, shuffle=False, verbose=0)
    assert int(opt.iterations.numpy()) == 6
    after = model.get_weights()
    assert all(np.isfinite(w).all() for w in after)
    assert all(not np.array_equal(a, b) for a, b in zip(after, before))
