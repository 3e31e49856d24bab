"""A small MNIST classifier with the layer kinds K-FAC covers: Conv2D, BatchNorm, Dense."""

from __future__ import annotations

import keras

NUM_CLASSES = 10


def build_convnet(
    *,
    filters: tuple[int, ...] = (16, 32),
    hidden: int = 64,
    seed: int | None = 0,
    name: str = "convnet",
) -> keras.Sequential:
    """(batch, 28, 28, 1) images → (batch, 10) logits.

    Each stage is Conv2D 3×3 (no bias: the BatchNormalization that follows
    has the shift) → BatchNormalization → ReLU → 2×2 max-pool; then a ReLU
    Dense layer and a linear Dense head. Compile with
    `SparseCategoricalCrossentropy(from_logits=True)`.
    """
    counter = iter(range(1_000))

    def init():
        return keras.initializers.GlorotUniform(
            seed=None if seed is None else int(seed) * 1000 + next(counter)
        )

    layers: list = [keras.Input((28, 28, 1))]
    for i, f in enumerate(filters):
        layers += [
            keras.layers.Conv2D(
                f,
                3,
                padding="same",
                use_bias=False,
                kernel_initializer=init(),
                name=f"conv_{i}",
            ),
            keras.layers.BatchNormalization(name=f"bn_{i}"),
            keras.layers.Activation("relu", name=f"relu_{i}"),
            keras.layers.MaxPooling2D(2, name=f"pool_{i}"),
        ]
    layers += [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(hidden, activation="relu", kernel_initializer=init(), name="hidden"),
        keras.layers.Dense(NUM_CLASSES, kernel_initializer=init(), name="logits"),
    ]
    return keras.Sequential(layers, name=name)


def convnet_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


__all__ = ["NUM_CLASSES", "build_convnet", "convnet_loss"]
