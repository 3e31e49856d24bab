"""The one-replica context: the default strategy and one-device strategies."""

from __future__ import annotations

import tensorflow as tf

from kfac_dist.strategies.base import CrossReplicaContext


class SingleReplicaContext(CrossReplicaContext):
    """Collectives of a single replica: identities, still counted."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__(strategy, num_replicas=1)

    def replica_id(self) -> tf.Tensor:
        return tf.constant(0, tf.int32)

    def _all_reduce_sum(self, buffer: tf.Tensor) -> tf.Tensor:
        return tf.identity(buffer)

    def _all_gather(self, buffer: tf.Tensor) -> tf.Tensor:
        return buffer[tf.newaxis]
