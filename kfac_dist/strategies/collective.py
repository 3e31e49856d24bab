"""The collective-ops context: MirroredStrategy and MultiWorkerMirroredStrategy.

`ReplicaContext.all_reduce` goes through `merge_call` on CPU devices, which
cannot run inside `tf.cond` (TF raises "merge_call called while defining a new
graph"). K-FAC's factor sync and inverse sharing happen only on inverse-update
steps, inside a `tf.cond`, so this context launches collective ops directly
with TensorFlow's own `CollectiveReplicaLauncher` — the same machinery
MultiWorkerMirroredStrategy uses for its all-reduce, and merge_call-free.

Instance keys (`_StableKeyLauncher`) name each collective by what it is, not by
when it was traced, so that workers which trace different functions (one
retraces for an uneven batch) still meet. Every collective carries a timeout:
a peer that is gone or frozen becomes a `DeadlineExceededError`, not a hang.
"""

from __future__ import annotations

import collections
import itertools
import weakref
import zlib
from typing import Any

import tensorflow as tf
from tensorflow.python.distribute import collective_util, cross_device_utils, device_util
from tensorflow.python.framework import func_graph
from tensorflow.python.ops import collective_ops

from kfac_dist.strategies.base import CrossReplicaContext

# Group keys of K-FAC's own, apart from the strategy's (which start at 1), so
# its instance keys never collide with Keras' gradient all-reduce; one new key
# per context, since a key names one set of devices for the whole process.
# Every worker creates its contexts in the same order, so the keys agree.
_GROUP_KEYS = itertools.count(1_000_000)

# Stable instance keys live in [2**30, 2**31): above the keys TensorFlow's own
# counter hands out in eager mode (from 1 up), inside int32.
_STABLE_KEY_BASE = 2**30


def stable_instance_key(identity: str) -> int:
    """The instance key of the collective named `identity`, the same in every process."""
    return _STABLE_KEY_BASE + zlib.crc32(identity.encode()) % _STABLE_KEY_BASE


def _function_graph() -> func_graph.FuncGraph | None:
    """The graph of the tf.function being traced, out of any control-flow branch."""
    graph = tf.compat.v1.get_default_graph()
    while getattr(graph, "is_control_flow_graph", False):
        graph = graph.outer_graph
    return graph if isinstance(graph, func_graph.FuncGraph) else None


class _StableKeyLauncher(cross_device_utils.CollectiveReplicaLauncher):
    """Instance keys from a per-collective identity, fixed at trace time.

    TensorFlow's default draws keys when the function is called, in an order
    that differs between replicas for collectives inside `tf.cond` branches
    (one replica's factor sync then met another's inverse sharing); a process
    counter at trace time breaks as soon as one worker retraces alone (an
    uneven `train_on_batch`): its keys move on and never meet its peers'.
    So a key is a hash of the traced function's name, the collective's kind,
    dtype and shape, and how many such collectives came before it in this
    trace — the same for every trace of the same step on every worker, and
    reused on every call, which collective instances allow. Equal keys imply
    equal shapes, so two functions can never pair mismatched collectives.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One counter per traced function; a retrace gets a fresh graph.
        self._ordinals: weakref.WeakKeyDictionary[func_graph.FuncGraph, collections.Counter[str]]
        self._ordinals = weakref.WeakKeyDictionary()
        self._role = "collective"
        self._keys: dict[int, str] = {}

    def _use_unique_instance_key(self) -> bool:
        return False

    def key_for(self, role: str) -> int | None:
        """Names the next collective `role` and returns its key (None when eager)."""
        graph = _function_graph()
        if graph is None:
            return None
        counts = self._ordinals.setdefault(graph, collections.Counter())
        identity = f"{graph.name}/{role}#{counts[role]}"
        counts[role] += 1
        key = stable_instance_key(identity)
        if self._keys.setdefault(key, identity) != identity:
            raise RuntimeError(
                f"K-FAC collectives {identity!r} and {self._keys[key]!r} hash to the "
                "same instance key; rename one of the tf.functions that hold them."
            )
        return key

    def named(self, role: str) -> _StableKeyLauncher:
        self._role = role
        return self

    def _next_instance_key(self) -> int:
        key = self.key_for(self._role)
        if key is None:  # eager: TensorFlow's own counter, in call order
            return super()._next_instance_key()
        return key


def _role(op: str, buffer: tf.Tensor) -> str:
    return f"{op}/{buffer.dtype.name}/{buffer.shape.as_list()}"


class CollectiveContext(CrossReplicaContext):
    """Collectives over every replica of a (multi-worker) mirrored strategy.

    `timeout_seconds` bounds each of K-FAC's collectives (and the gradient
    all-reduce routed through the context): past it the step raises
    `DeadlineExceededError`. None waits forever.
    """

    def __init__(self, strategy: tf.distribute.Strategy, timeout_seconds: float | None = None):
        super().__init__(strategy, num_replicas=strategy.num_replicas_in_sync)
        devices = tuple(device_util.canonicalize(d) for d in strategy.extended.worker_devices)
        keys = cross_device_utils.CollectiveKeys(group_key_start=next(_GROUP_KEYS))
        group_key = keys.get_group_key(devices)
        self.timeout_seconds = timeout_seconds
        self._options = collective_util.Options(timeout_seconds=timeout_seconds)
        self._launchers = [
            _StableKeyLauncher(group_key, self.num_replicas, keys, device, self._options)
            for device in devices
        ]

    def replica_id(self) -> tf.Tensor:
        return tf.distribute.get_replica_context().replica_id_in_sync_group

    def _launcher(self) -> _StableKeyLauncher:
        local_id = tf.distribute.get_replica_context()._replica_id  # noqa: SLF001
        return self._launchers[local_id]

    def _gradient_options(self) -> tf.distribute.experimental.CommunicationOptions | None:
        if self.timeout_seconds is None:
            return None
        return tf.distribute.experimental.CommunicationOptions(timeout_seconds=self.timeout_seconds)

    def _all_reduce_sum(self, buffer: tf.Tensor) -> tf.Tensor:
        launcher = self._launcher().named(_role("all_reduce", buffer))
        return launcher.all_reduce(buffer, options=self._options)

    has_broadcast = True

    def _broadcast(self, buffer: tf.Tensor, is_source: tf.Tensor) -> tf.Tensor:
        # Both branches hold a collective with the same keys: the source sends,
        # the others receive.
        launcher = self._launcher()
        group_key = launcher._group_key  # noqa: SLF001
        instance_key = launcher.key_for(_role("broadcast", buffer))
        if instance_key is None:
            instance_key = launcher._next_instance_key()  # noqa: SLF001
        device = launcher._device  # noqa: SLF001
        timeout = self.timeout_seconds or 0

        def send() -> tf.Tensor:
            with tf.device(device):
                return collective_ops.broadcast_send_v2(
                    buffer, self.num_replicas, group_key, instance_key, timeout=timeout
                )

        def receive() -> tf.Tensor:
            with tf.device(device):
                return collective_ops.broadcast_recv_v2(
                    tf.shape(buffer),
                    buffer.dtype,
                    self.num_replicas,
                    group_key,
                    instance_key,
                    timeout=timeout,
                )

        return tf.cond(is_source, send, receive)

    def _all_gather(self, buffer: tf.Tensor) -> tf.Tensor:
        launcher = self._launcher().named(_role("all_gather", buffer))
        gathered = launcher._all_gather(buffer[tf.newaxis], self._options)  # noqa: SLF001
        return tf.reshape(gathered, [self.num_replicas, -1])
