"""The TPU context: collectives of `TPUStrategy` inside the replicated XLA step.

On TPU every collective lowers to an XLA cross-replica op that may sit inside
a conditional, so the replica context's own `all_reduce` / `all_gather` are
used as they are, and the replica id is a run-time tensor.
"""

from __future__ import annotations

import tensorflow as tf

from kfac_dist.strategies.base import CrossReplicaContext


class TpuContext(CrossReplicaContext):
    """Collectives over the cores of a TPU (not run on TPU hardware here)."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__(strategy, num_replicas=strategy.num_replicas_in_sync)

    def replica_id(self) -> tf.Tensor:
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def _all_reduce_sum(self, buffer: tf.Tensor) -> tf.Tensor:
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, buffer)

    def _all_gather(self, buffer: tf.Tensor) -> tf.Tensor:
        gathered = tf.distribute.get_replica_context().all_gather(buffer[tf.newaxis], axis=0)
        return tf.reshape(gathered, [self.num_replicas, -1])
