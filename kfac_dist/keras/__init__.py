"""The namespace of kfac 0.2.4's Keras API: `kfac.keras.optimizers`, `kfac.keras.saving_utils`."""

from kfac_dist.keras import optimizers, saving_utils

__all__ = ["optimizers", "saving_utils"]
