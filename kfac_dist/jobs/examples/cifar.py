"""CIFAR-10 for the examples: a tensorflow-datasets loader and a small K-FAC-ready ResNet.

`load_cifar10` reads CIFAR-10 from `tensorflow_datasets` (a prepared
`data_dir`, or a download when `download=True`). Unlike MNIST there is no
offline fallback: when tfds is not installed or the data cannot be had, it
raises a `RuntimeError` that says why and how to get the data.
`build_small_resnet` uses only Conv2D, BatchNormalization and Dense for its
weights, so K-FAC registers every trainable layer automatically.
"""

from __future__ import annotations

import keras
import numpy as np

from kfac_dist.jobs.examples import data

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


def load_cifar10(
    split: str = "train",
    limit: int | None = None,
    data_dir: str | None = None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 images (n, 32, 32, 3) float32 in [0, 1] and int64 labels in 0..9.

    Args:
        split: tfds split ("train", "test", "train[:5000]", ...).
        limit: keep the first `limit` examples (None: all).
        data_dir: a tfds data directory (a prepared one works offline).
        download: let tfds download and prepare the data if it is missing.

    Raises:
        RuntimeError: tensorflow-datasets is missing or the data cannot be
            loaded; there is no offline fallback for CIFAR-10.
    """
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    how = (
        "Install it with `pip install 'kfac-dist[examples]'` (by hand: "
        "`pip install tensorflow-datasets importlib_resources`) and allow network access "
        "for the download, or pass a `data_dir` where 'cifar10' is already prepared. "
        "There is no offline fallback for CIFAR-10."
    )
    try:
        images, labels = data.from_tfds("cifar10", split, data_dir, download)
    except Exception as error:  # noqa: BLE001 - any failure: say why and how
        raise RuntimeError(
            f"CIFAR-10 could not be loaded from tensorflow-datasets ({data.why(error)}). {how}"
        ) from error
    if limit is not None:
        images, labels = images[: int(limit)], labels[: int(limit)]
    return images.reshape((-1, *IMAGE_SHAPE)), labels


def build_small_resnet(
    num_classes: int = NUM_CLASSES,
    width: int = 16,
    blocks_per_stage: int = 1,
    seed: int | None = 0,
) -> keras.Model:
    """(batch, 32, 32, 3) images → (batch, num_classes) softmax probabilities.

    A 3×3 stem conv (`width` filters) → BN → ReLU, then 3 stages of
    `blocks_per_stage` residual blocks with width, 2·width and 4·width filters
    (the first block of stages 2 and 3 has stride 2). A block is conv 3×3 → BN
    → ReLU → conv 3×3 → BN, added to the shortcut (a strided 1×1 conv → BN
    when the shape changes, else the identity), then ReLU. Global average
    pooling and a Dense softmax head follow. Convs have no bias (the BN that
    follows has the shift). Compile with "sparse_categorical_crossentropy".
    """
    if width < 1 or blocks_per_stage < 1:
        raise ValueError(
            f"width and blocks_per_stage must be >= 1, got {width}, {blocks_per_stage}."
        )
    counter = iter(range(10_000))

    def init():
        return keras.initializers.HeNormal(
            seed=None if seed is None else int(seed) * 10_000 + next(counter)
        )

    def conv(x, filters: int, kernel: int, stride: int, name: str):
        return keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            kernel_initializer=init(),
            name=name,
        )(x)

    def bn(x, name: str):
        return keras.layers.BatchNormalization(name=name)(x)

    inputs = keras.Input(IMAGE_SHAPE, name="images")
    x = conv(inputs, width, 3, 1, "stem_conv")
    x = keras.layers.ReLU(name="stem_relu")(bn(x, "stem_bn"))
    for stage in range(3):
        filters = width * 2**stage
        for block in range(blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            p = f"s{stage}b{block}_"
            y = conv(x, filters, 3, stride, p + "conv1")
            y = keras.layers.ReLU(name=p + "relu1")(bn(y, p + "bn1"))
            y = bn(conv(y, filters, 3, 1, p + "conv2"), p + "bn2")
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = bn(conv(x, filters, 1, stride, p + "proj"), p + "proj_bn")
            x = keras.layers.Add(name=p + "add")([y, shortcut])
            x = keras.layers.ReLU(name=p + "relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer=init(), name="probs"
    )(x)
    return keras.Model(inputs, outputs, name="small_resnet")


__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "build_small_resnet", "load_cifar10"]
