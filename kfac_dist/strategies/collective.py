"""The collective-ops context: MirroredStrategy and MultiWorkerMirroredStrategy.

`ReplicaContext.all_reduce` goes through `merge_call` on CPU devices, which
cannot run inside `tf.cond` (TF raises "merge_call called while defining a new
graph"). K-FAC's factor sync and inverse sharing happen only on inverse-update
steps, inside a `tf.cond`, so this context launches collective ops directly
with TensorFlow's own `CollectiveReplicaLauncher` — the same machinery
MultiWorkerMirroredStrategy uses for its all-reduce, and merge_call-free.
"""

from __future__ import annotations

import itertools

import tensorflow as tf
from tensorflow.python.distribute import collective_util, cross_device_utils, device_util
from tensorflow.python.ops import collective_ops

from kfac_dist.strategies.base import CrossReplicaContext

# Group keys of K-FAC's own, apart from the strategy's (which start at 1), so
# its instance keys never collide with Keras' gradient all-reduce; one new key
# per context, since a key names one set of devices for the whole process.
# Every worker creates its contexts in the same order, so the keys agree.
_GROUP_KEYS = itertools.count(1_000_000)


class _TraceTimeKeyLauncher(cross_device_utils.CollectiveReplicaLauncher):
    """Instance keys fixed when the step is traced, in trace order.

    TensorFlow's default draws keys when the function is called, in an order
    that differs between replicas for collectives inside `tf.cond` branches
    (one replica's factor sync then met another's inverse sharing). Every
    replica traces K-FAC's collectives in the same program order, so keys
    drawn at trace time agree, and reusing them on every call is what
    collective instances allow.
    """

    def _use_unique_instance_key(self):
        return False


class CollectiveContext(CrossReplicaContext):
    """Collectives over every replica of a (multi-worker) mirrored strategy."""

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__(strategy, num_replicas=strategy.num_replicas_in_sync)
        devices = tuple(device_util.canonicalize(d) for d in strategy.extended.worker_devices)
        keys = cross_device_utils.CollectiveKeys(group_key_start=next(_GROUP_KEYS))
        group_key = keys.get_group_key(devices)
        self._options = collective_util.Options()
        self._launchers = [
            _TraceTimeKeyLauncher(group_key, self.num_replicas, keys, device, self._options)
            for device in devices
        ]

    def replica_id(self) -> tf.Tensor:
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def _launcher(self):
        local_id = tf.distribute.get_replica_context()._replica_id  # noqa: SLF001
        return self._launchers[local_id]

    def _all_reduce_sum(self, buffer: tf.Tensor) -> tf.Tensor:
        return self._launcher().all_reduce(buffer, options=self._options)

    has_broadcast = True

    def _broadcast(self, buffer: tf.Tensor, is_source: tf.Tensor) -> tf.Tensor:
        # Both branches hold a collective with the same keys: the source sends,
        # the others receive.
        launcher = self._launcher()
        group_key = launcher._group_key  # noqa: SLF001
        instance_key = launcher._next_instance_key()  # noqa: SLF001
        device = launcher._device  # noqa: SLF001

        def send():
            with tf.device(device):
                return collective_ops.broadcast_send_v2(
                    buffer, self.num_replicas, group_key, instance_key
                )

        def receive():
            with tf.device(device):
                return collective_ops.broadcast_recv_v2(
                    tf.shape(buffer), buffer.dtype, self.num_replicas, group_key, instance_key
                )

        return tf.cond(is_source, send, receive)

    def _all_gather(self, buffer: tf.Tensor) -> tf.Tensor:
        gathered = self._launcher()._all_gather(buffer[tf.newaxis], self._options)  # noqa: SLF001
        return tf.reshape(gathered, [self.num_replicas, -1])
