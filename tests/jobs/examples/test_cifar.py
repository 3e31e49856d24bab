"""The CIFAR-10 example: the small ResNet trains under K-FAC; the loader says how to get tfds."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest

import kfac_dist
from kfac_dist.jobs.examples import cifar


def test_small_resnet_has_the_documented_shapes_and_layer_kinds():
    model = cifar.build_small_resnet(num_classes=7, width=4, blocks_per_stage=2)
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, 7)
    probs = model(np.zeros((2, 32, 32, 3), np.float32))
    np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, rtol=1e-5)
    weighted = {type(layer) for layer in model.layers if layer.trainable_weights}
    allowed = {keras.layers.Conv2D, keras.layers.BatchNormalization, keras.layers.Dense}
    assert weighted <= allowed
    # stem + 3 stages × 2 blocks × 2 convs + 2 projections (stages 2 and 3)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 12 + 2


def test_kfac_registers_the_resnet_and_fits_two_steps():
    model = cifar.build_small_resnet(width=4)
    opt = kfac_dist.Kfac(
        learning_rate=0.05, damping=0.1, model=model, loss="sparse_categorical_crossentropy"
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, size=16)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))


def test_load_cifar10_without_tfds_raises_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(RuntimeError, match="tensorflow-datasets") as info:
        cifar.load_cifar10(limit=4)
    assert "pip install tensorflow-datasets" in str(info.value)
    assert "no offline fallback" in str(info.value)


def test_load_cifar10_wraps_a_download_failure(monkeypatch):
    class FailingTfds:
        @staticmethod
        def load(*args, **kwargs):
            raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", FailingTfds)
    with pytest.raises(RuntimeError, match="ConnectionError: no route to host"):
        cifar.load_cifar10()


def test_load_cifar10_scales_tfds_images_to_unit_floats(monkeypatch):
    class FakeTfds:
        @staticmethod
        def load(name, **kwargs):
            assert name == "cifar10"
            return np.full((5, 32, 32, 3), 255, np.uint8), np.arange(5)

        @staticmethod
        def as_numpy(arrays):
            return arrays

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTfds)
    images, labels = cifar.load_cifar10(limit=3)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.float32
    assert images.max() == 1.0
    assert labels.tolist() == [0, 1, 2]
