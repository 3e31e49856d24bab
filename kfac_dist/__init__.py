"""kfac_dist: K-FAC for Keras 3 under every tf.distribute strategy.

`import kfac_dist as kfac` gives the API of kfac 0.2.4's Keras README:
`kfac.keras.optimizers.Kfac` and `kfac.keras.saving_utils.load_model`.

The names below load on first use, so that the pure-Python parts
(`kfac_dist.placement`, `kfac_dist.heartbeat`, the launcher in
`kfac_dist.jobs`) import without TensorFlow or Keras; the optimizer checks
their versions when it is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Kfac": "kfac_dist.optimizer",
    "LayerCollection": "kfac_dist.registration",
    "calls_kfac_step": "kfac_dist.training",
    "enable_multi_worker_fit": "kfac_dist.multi_worker",
    "kfac_train_step": "kfac_dist.training",
}
__all__ = [*_EXPORTS, "keras"]


def __getattr__(name: str) -> Any:
    if name == "keras":
        return importlib.import_module("kfac_dist.keras")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kfac_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
