"""Cross-replica contexts, one per tf.distribute strategy family, and `resolve`."""

from __future__ import annotations

import tensorflow as tf

from kfac_dist.strategies.base import (
    ADAPTIVE,
    FACTOR_SYNC,
    GRADIENTS,
    INVERSE_SHARE,
    KINDS,
    PRECONDITIONED,
    CrossReplicaContext,
)
from kfac_dist.strategies.collective import CollectiveContext
from kfac_dist.strategies.default import SingleReplicaContext
from kfac_dist.strategies.tpu import TpuContext

SUPPORTED = (
    "the default strategy, OneDeviceStrategy, MirroredStrategy, "
    "MultiWorkerMirroredStrategy, TPUStrategy"
)


def resolve(
    strategy: tf.distribute.Strategy | None = None, collective_timeout: float | None = None
) -> CrossReplicaContext:
    """The context for `strategy` (default: the active one).

    `collective_timeout` (seconds, None: none) bounds each collective of a
    mirrored context; TPU collectives are compiled by XLA and cannot time out.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)):
        return TpuContext(strategy)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return CollectiveContext(strategy, collective_timeout)
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        if strategy.num_replicas_in_sync == 1:
            return SingleReplicaContext(strategy)
        return CollectiveContext(strategy, collective_timeout)
    if isinstance(strategy, tf.distribute.OneDeviceStrategy) or (
        strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()
    ):
        return SingleReplicaContext(strategy)
    raise ValueError(
        f"K-FAC does not support {type(strategy).__name__}: its curvature state "
        "must live on the replicas that compute the gradients, which rules out "
        f"parameter servers. Supported: {SUPPORTED}."
    )


__all__ = [
    "ADAPTIVE",
    "PRECONDITIONED",
    "FACTOR_SYNC",
    "GRADIENTS",
    "INVERSE_SHARE",
    "KINDS",
    "CollectiveContext",
    "CrossReplicaContext",
    "SingleReplicaContext",
    "TpuContext",
    "resolve",
]
