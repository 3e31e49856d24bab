"""`kfac.keras.saving_utils.load_model`: load a `.keras` file compiled with Kfac.

Keras builds the optimizer of a loaded model before any model exists for it
to bind to, and Kfac needs its model (its layers are its curvature blocks).
This loader does what the reference's did: load the model, construct the
optimizer bound to it, compile, build, then restore the optimizer's state —
factors, inverses, counters, momentum and the step that seeds its sampling.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Any

import h5py
import keras
from keras.src.saving import serialization_lib

from kfac_dist.optimizer import Kfac


def load_model(
    filepath: str | os.PathLike[str],
    custom_objects: dict[str, Any] | None = None,
    compile: bool = True,
    safe_mode: bool = True,
) -> keras.Model:
    """Like `keras.models.load_model`, binding a saved Kfac to the loaded model."""
    model = keras.models.load_model(
        filepath, custom_objects=custom_objects, compile=False, safe_mode=safe_mode
    )
    with zipfile.ZipFile(filepath) as archive:
        config = json.loads(archive.read("config.json"))
        compile_config = config.get("compile_config")
        if not compile or not compile_config:
            return model
        optimizer_config = compile_config.pop("optimizer")
        kfac_config = _kfac_config(optimizer_config)
        if kfac_config is None:
            model.compile_from_config({**compile_config, "optimizer": optimizer_config})
            return model
        with model.distribute_strategy.scope():
            optimizer = Kfac.from_config(kfac_config, custom_objects, model=model)
            if optimizer_config["class_name"] == "LossScaleOptimizer":
                # mixed_float16: the loss scale and its counter are saved state too.
                wrapper = dict(optimizer_config["config"])
                del wrapper["inner_optimizer"]
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, **wrapper)
            rest = serialization_lib.deserialize_keras_object(compile_config, custom_objects)
            model.compile(optimizer=optimizer, **rest)
            optimizer.build(model.trainable_variables)
        weights = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(weights, "r") as store:
        saved = store["optimizer"]["vars"]
        optimizer.load_own_variables({key: saved[key][()] for key in saved})
    return model


def _kfac_config(optimizer_config: dict[str, Any]) -> dict[str, Any] | None:
    """The saved Kfac's config, alone or inside a LossScaleOptimizer; None if no Kfac."""
    if optimizer_config.get("class_name") == "LossScaleOptimizer":
        optimizer_config = optimizer_config["config"]["inner_optimizer"]
    if optimizer_config.get("class_name") != "Kfac":
        return None
    return optimizer_config["config"]


__all__ = ["load_model"]
