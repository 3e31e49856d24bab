"""The TensorFlow and Keras range kfac_dist is tested on, checked when this is imported.

The project relies on internals of both (the TF trainer's hooks, the
collective launchers of tf.distribute), so other versions fail early and
clearly instead of training wrongly.
"""

from __future__ import annotations

import keras
import tensorflow as tf

TESTED = {"tensorflow": ("2.21",), "keras": ("3.15",)}


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def check() -> None:
    for package, version in (
        ("tensorflow", tf.__version__),
        ("keras", keras.__version__),
    ):
        if _minor(version) not in TESTED[package]:
            raise ImportError(
                f"kfac_dist is tested with {package} {', '.join(TESTED[package])}.x and relies on "
                f"its internals; found {package} {version}. Install the tested range: "
                "pip install 'tensorflow>=2.21,<2.22' 'keras>=3.15,<3.16'."
            )
    if keras.backend.backend() != "tensorflow":
        raise ImportError(
            f"kfac_dist needs the TensorFlow backend of Keras; KERAS_BACKEND is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow."
        )


check()
