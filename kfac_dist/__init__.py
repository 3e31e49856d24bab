"""kfac_dist: K-FAC for Keras 3 under every tf.distribute strategy.

`import kfac_dist as kfac` gives the API of kfac 0.2.4's Keras README:
`kfac.keras.optimizers.Kfac` and `kfac.keras.saving_utils.load_model`.
"""

from kfac_dist import _versions

_versions.check()

from kfac_dist import keras  # noqa: E402
from kfac_dist.multi_worker import enable_multi_worker_fit  # noqa: E402
from kfac_dist.optimizer import Kfac  # noqa: E402
from kfac_dist.registration import LayerCollection  # noqa: E402
from kfac_dist.training import calls_kfac_step, kfac_train_step  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "Kfac",
    "LayerCollection",
    "calls_kfac_step",
    "enable_multi_worker_fit",
    "keras",
    "kfac_train_step",
]
