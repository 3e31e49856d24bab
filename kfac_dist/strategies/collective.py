"""The collective-ops context: MirroredStrategy and MultiWorkerMirroredStrategy.

`ReplicaContext.all_reduce` goes through `merge_call` on CPU devices, which
cannot run inside `tf.cond` (TF raises "merge_call called while defining a new
graph"). K-FAC's factor sync and inverse sharing happen only on inverse-update
steps, inside a `tf.cond`, so this context launches collective ops directly
with TensorFlow's own `CollectiveReplicaLauncher` — the same machinery
MultiWorkerMirroredStrategy uses for its all-reduce, and merge_call-free.
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow.python.distribute import collective_util
from tensorflow.python.distribute import cross_device_ops as cross_device_ops_lib

from kfac_dist.strategies.base import CrossReplicaContext


class CollectiveContext(CrossReplicaContext):
    """Collectives over every replica of a (multi-worker) mirrored strategy."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__(strategy, num_replicas=strategy.num_replicas_in_sync)
        extended = strategy.extended
        multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        if multi_worker:
            # Share the strategy's own group: its keys already span the workers.
            self._collectives = extended._cross_device_ops  # noqa: SLF001
        else:
            self._collectives = cross_device_ops_lib.CollectiveAllReduce(
                devices=extended.worker_devices,
                group_size=self.num_replicas,
                options=collective_util.Options(),
            )
        self._options = collective_util.Options()

    def replica_id(self) -> tf.Tensor:
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def _launcher(self):
        local_id = tf.distribute.get_replica_context()._replica_id  # noqa: SLF001
        return self._collectives._launchers[local_id]  # noqa: SLF001

    def _all_reduce_sum(self, buffer: tf.Tensor) -> tf.Tensor:
        return self._launcher().all_reduce(buffer, options=self._options)

    def _all_gather(self, buffer: tf.Tensor) -> tf.Tensor:
        gathered = self._launcher()._all_gather(buffer[tf.newaxis], self._options)  # noqa: SLF001
        return tf.reshape(gathered, [self.num_replicas, -1])
