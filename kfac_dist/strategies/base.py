"""The cross-replica context: every collective K-FAC issues, counted.

K-FAC adds three kinds of communication to a step: the gradient all-reduce
(Keras' own, routed here only to be counted), the packed factor sync and the
sharing of inverses. Each context implements the collectives of one strategy
family in replica context; this base class packs many tensors into one flat
buffer and keeps per-replica counters of calls and bytes.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import tensorflow as tf

# The kinds of collective the project issues; tests and reports read them.
GRADIENTS = "gradients"
FACTOR_SYNC = "factor_sync"
INVERSE_SHARE = "inverse_share"
ADAPTIVE = "adaptive"
#: The distributed blocks' preconditioned gradients (`distributed_preconditioning`).
PRECONDITIONED = "preconditioned"
KINDS = (GRADIENTS, FACTOR_SYNC, INVERSE_SHARE, ADAPTIVE, PRECONDITIONED)


def _local_counter(name: str) -> tf.Variable:
    # One copy per replica, never aggregated: counting must not communicate.
    return tf.Variable(
        0,
        dtype=tf.int64,
        trainable=False,
        name=name,
        synchronization=tf.VariableSynchronization.ON_READ,
        aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
    )


def pack(tensors: Sequence[tf.Tensor]) -> tf.Tensor:
    """Concatenates tensors into one flat buffer (one collective for all)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unpack(buffer: tf.Tensor, like: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """Splits a flat buffer back into tensors shaped like `like`."""
    sizes = [t.shape.num_elements() for t in like]
    parts = tf.split(buffer, sizes) if len(sizes) > 1 else [buffer]
    return [tf.reshape(p, t.shape) for p, t in zip(parts, like)]


class CrossReplicaContext(abc.ABC):
    """Collectives of one strategy family, called in replica context."""

    def __init__(self, strategy: tf.distribute.Strategy, num_replicas: int):
        self.strategy = strategy
        self.num_replicas = num_replicas
        with strategy.scope():
            self._calls = {k: _local_counter(f"kfac_{k}_calls") for k in KINDS}
            self._bytes = {k: _local_counter(f"kfac_{k}_bytes") for k in KINDS}

    # --- what every strategy family implements -------------------------
    @abc.abstractmethod
    def replica_id(self) -> tf.Tensor:
        """This replica's id in [0, num_replicas), a run-time int32 tensor."""

    @abc.abstractmethod
    def _all_reduce_sum(self, buffer: tf.Tensor) -> tf.Tensor:
        """One sum all-reduce of a flat buffer."""

    @abc.abstractmethod
    def _all_gather(self, buffer: tf.Tensor) -> tf.Tensor:
        """One all-gather of equally sized flat buffers: (num_replicas, size)."""

    #: whether `broadcast` is a true one-to-all collective (not an all-reduce).
    has_broadcast = False

    def _broadcast(self, buffer: tf.Tensor, is_source: tf.Tensor) -> tf.Tensor:
        """The source's buffer on every replica; by default a masked sum all-reduce."""
        return self._all_reduce_sum(tf.where(is_source, buffer, tf.zeros_like(buffer)))

    # --- counted public collectives --------------------------------------
    def all_reduce_sum(self, tensors: Sequence[tf.Tensor], kind: str) -> list[tf.Tensor]:
        """Sums every replica's tensors with one collective of a packed buffer."""
        buffer = pack(tensors)
        self._count(kind, buffer)
        return unpack(self._all_reduce_sum(buffer), tensors)

    def all_gather(self, buffer: tf.Tensor, kind: str) -> tf.Tensor:
        """Gathers every replica's flat buffer (same size on all) in one collective."""
        self._count(kind, buffer)
        return self._all_gather(buffer)

    def broadcast(self, buffer: tf.Tensor, is_source: tf.Tensor, kind: str) -> tf.Tensor:
        """The buffer of the replica where `is_source` holds, on every replica."""
        sent = tf.where(is_source, tf.constant(_nbytes(buffer), tf.int64), tf.constant(0, tf.int64))
        self._count(kind, None, sent)
        return self._broadcast(buffer, is_source)

    def all_reduce_gradients(
        self, grads: Sequence[tf.Tensor], conditional: bool = False
    ) -> list[tf.Tensor]:
        """The step's one gradient all-reduce (sum), as Keras' optimizer does it.

        It stays on the strategy's own path (the same collective Keras would
        issue); routing it here only makes it visible to the counters. Inside
        a `tf.cond` (`conditional`: gradient accumulation updates on every
        k-th call only) that path's `merge_call` is refused, so the context's
        own collective carries the gradients, packed into one buffer.
        """
        if conditional:
            return self.all_reduce_sum(grads, GRADIENTS)
        self._count(GRADIENTS, None, sum(_nbytes(g) for g in grads))
        return tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, list(grads), options=self._gradient_options()
        )

    def _gradient_options(self) -> tf.distribute.experimental.CommunicationOptions | None:
        """Options of the gradient all-reduce (a context's collective timeout)."""
        return None

    def _count(self, kind: str, buffer: tf.Tensor | None, nbytes: int | None = None) -> None:
        if kind not in self._calls:
            raise ValueError(f"Unknown collective kind {kind!r}; expected one of {KINDS}.")
        nbytes = _nbytes(buffer) if nbytes is None else nbytes
        self._calls[kind].assign_add(1)
        self._bytes[kind].assign_add(nbytes)

    # --- reading the counters (outside replica context) --------------------
    def counts(self, replica: int = 0) -> dict[str, dict[str, int]]:
        """Calls and bytes per kind, as seen by one replica of this process."""
        out: dict[str, dict[str, int]] = {}
        for kind in KINDS:
            calls = self.strategy.experimental_local_results(self._calls[kind])
            nbytes = self.strategy.experimental_local_results(self._bytes[kind])
            out[kind] = {"calls": int(calls[replica]), "bytes": int(nbytes[replica])}
        return out

    def reset_counts(self) -> None:
        for var in (*self._calls.values(), *self._bytes.values()):
            for local in self.strategy.experimental_local_results(var):
                local.assign(0)


def _nbytes(tensor: tf.Tensor) -> int:
    return tensor.shape.num_elements() * tensor.dtype.size
