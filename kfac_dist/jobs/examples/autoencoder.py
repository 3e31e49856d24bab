"""The MNIST deep autoencoder of the benchmarks: 784-512-256-32-256-512-784, tanh.

Hidden layers use tanh; the 32-unit code layer is tanh too by default
(`code_activation="tanh"`), as in kfac-jax's MNIST autoencoder, whose Haiku
MLP applies its activation to every layer but the last: that is the model
kfac-jax's reference numbers were measured on (loss 100 at ~146 steps with
lr 1, damping 1, norm constraint 0.01; BENCHMARKS.md). `code_activation=None` gives
the linear code layer of Hinton & Salakhutdinov (2006). The output layer is
linear: it returns logits for `BinaryCrossentropy(from_logits=True)` with loss
weight 784, i.e. the sigmoid cross-entropy summed over the 784 pixels and
averaged over the batch (Keras' BCE averages over the last axis).
"""

from __future__ import annotations

import keras

ENCODER_SIZES = (512, 256)
CODE_SIZE = 32
DECODER_SIZES = (256, 512)
PIXELS = 784
LOSS_WEIGHT = float(PIXELS)


def build_autoencoder(
    *,
    activation: str = "tanh",
    code_activation: str | None = "tanh",
    kernel_initializer: str = "glorot_uniform",
    seed: int | None = 0,
    name: str = "autoencoder",
) -> keras.Sequential:
    """The autoencoder: (batch, 784) images in [0, 1] → (batch, 784) logits.

    `kernel_initializer` is a Keras initializer name: "glorot_uniform"
    (Keras' default, zero biases) or e.g. "lecun_normal" (a truncated normal
    with variance 1/fan_in: Haiku's default, the one kfac-jax's runs start
    from). `seed` makes the initial weights reproducible; None draws fresh ones.
    """
    layers: list = []

    def dense(units, act, layer_name):
        # One fixed seed per layer: the same `seed` gives the same weights.
        config = {"seed": None if seed is None else int(seed) * 1000 + len(layers)}
        initializer = keras.initializers.get({"class_name": kernel_initializer, "config": config})
        return keras.layers.Dense(
            units, activation=act, kernel_initializer=initializer, name=layer_name
        )

    for i, units in enumerate(ENCODER_SIZES):
        layers.append(dense(units, activation, f"encoder_{i}"))
    layers.append(dense(CODE_SIZE, code_activation, "code"))
    for i, units in enumerate(DECODER_SIZES):
        layers.append(dense(units, activation, f"decoder_{i}"))
    layers.append(dense(PIXELS, None, "logits"))
    return keras.Sequential([keras.Input((PIXELS,)), *layers], name=name)


def autoencoder_loss() -> keras.losses.Loss:
    """Sigmoid cross-entropy on logits; compile it with `loss_weights=LOSS_WEIGHT`."""
    return keras.losses.BinaryCrossentropy(from_logits=True)


def compile_autoencoder(model: keras.Model, optimizer) -> keras.Model:
    """Compiles with the benchmark's loss: 784 × BCE(from_logits) (summed over pixels)."""
    model.compile(optimizer=optimizer, loss=autoencoder_loss(), loss_weights=LOSS_WEIGHT)
    return model


__all__ = [
    "CODE_SIZE",
    "LOSS_WEIGHT",
    "PIXELS",
    "autoencoder_loss",
    "build_autoencoder",
    "compile_autoencoder",
]
