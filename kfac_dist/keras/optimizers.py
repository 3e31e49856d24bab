"""`kfac.keras.optimizers.Kfac`, as in kfac 0.2.4."""

from kfac_dist.optimizer import Kfac

__all__ = ["Kfac"]
