"""Cross-replica contexts: resolution, packed collectives, counters."""

import numpy as np
import pytest
import tensorflow as tf

from kfac_dist import strategies
from kfac_dist.strategies import CollectiveContext, SingleReplicaContext, TpuContext


def mirrored(n):
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(n)], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )


def test_resolve_picks_one_context_per_strategy_family():
    assert isinstance(strategies.resolve(tf.distribute.get_strategy()), SingleReplicaContext)
    assert isinstance(
        strategies.resolve(tf.distribute.OneDeviceStrategy("/cpu:0")), SingleReplicaContext
    )
    assert isinstance(strategies.resolve(mirrored(2)), CollectiveContext)


def test_unsupported_strategy_raises_naming_it_and_the_supported_ones():
    strategy = tf.distribute.experimental.CentralStorageStrategy(["/cpu:0", "/cpu:1"])
    with pytest.raises(
        ValueError, match="CentralStorageStrategy.*Supported:.*MultiWorkerMirroredStrategy"
    ):
        strategies.resolve(strategy)


def _exercise(context, strategy):
    """Runs one packed all-reduce and one all-gather in every replica."""

    @tf.function(autograph=False)
    def step():
        def replica_fn():
            rid = tf.cast(context.replica_id(), tf.float32)
            summed = context.all_reduce_sum(
                [tf.fill([2, 2], rid + 1.0), tf.reshape(rid, [1])], strategies.FACTOR_SYNC
            )
            gathered = context.all_gather(tf.fill([3], rid), strategies.INVERSE_SHARE)
            return summed[0], summed[1], gathered

        return strategy.run(replica_fn)

    return [strategy.experimental_local_results(t) for t in step()]


@pytest.mark.parametrize("context_cls", [CollectiveContext, TpuContext])
def test_packed_all_reduce_and_all_gather_on_two_replicas(context_cls):
    strategy = mirrored(2)
    # The TPU context runs on the replica context's own collectives, which the
    # mirrored replica context provides too: its logic is exercised here.
    context = context_cls(strategy)
    matrices, scalars, gathered = _exercise(context, strategy)
    for replica in range(2):
        np.testing.assert_allclose(matrices[replica], np.full((2, 2), 3.0))
        np.testing.assert_allclose(scalars[replica], [1.0])
        np.testing.assert_allclose(gathered[replica], [[0.0] * 3, [1.0] * 3])
        counts = context.counts(replica)
        assert counts[strategies.FACTOR_SYNC] == {"calls": 1, "bytes": 5 * 4}
        assert counts[strategies.INVERSE_SHARE] == {"calls": 1, "bytes": 3 * 4}
    context.reset_counts()
    assert context.counts(1)[strategies.FACTOR_SYNC]["calls"] == 0


def test_single_replica_context_is_identity_and_still_counts():
    strategy = tf.distribute.get_strategy()
    context = SingleReplicaContext(strategy)
    matrices, scalars, gathered = _exercise(context, strategy)
    np.testing.assert_allclose(matrices[0], np.ones((2, 2)))
    np.testing.assert_allclose(gathered[0], [[0.0] * 3])
    assert context.counts()[strategies.FACTOR_SYNC]["calls"] == 1


def _graph_nodes(concrete) -> list:
    graph_def = concrete.graph.as_graph_def()
    return list(graph_def.node) + [n for f in graph_def.library.function for n in f.node_def]


def _stable_keys(concrete) -> list[int]:
    """The int32 constants in the traced graph that are K-FAC's instance keys."""
    keys = []
    for node in _graph_nodes(concrete):
        if node.op == "Const" and node.attr["dtype"].type == tf.int32.as_datatype_enum:
            value = tf.make_ndarray(node.attr["value"].tensor)
            if value.shape == () and int(value) >= 2**30:
                keys.append(int(value))
    return sorted(keys)


def test_instance_keys_do_not_depend_on_what_was_traced_before():
    # A worker that retraces its step alone (an uneven batch) must keep the
    # keys its peers traced once: the same collectives, the same keys.
    strategy = mirrored(2)
    context = CollectiveContext(strategy, timeout_seconds=7.0)

    @tf.function(autograph=False)
    def step(x):
        def replica_fn(x):
            rid = context.replica_id()
            summed = context.all_reduce_sum([tf.reduce_sum(x) * tf.ones([3])], "factor_sync")
            shared = context.broadcast(summed[0], tf.equal(rid, 0), strategies.INVERSE_SHARE)
            gathered = context.all_gather(tf.ones([2]), strategies.INVERSE_SHARE)
            return shared, gathered

        return strategy.run(replica_fn, args=(x,))

    first = step.get_concrete_function(tf.TensorSpec([8, 2]))
    other = step.get_concrete_function(tf.TensorSpec([8, 4]))  # traced in between
    retraced = step.get_concrete_function(tf.TensorSpec([7, 2]))
    keys = _stable_keys(first)
    assert len(set(keys)) == 3  # one key per collective, the same on both replicas
    assert _stable_keys(retraced) == keys == _stable_keys(other)
    collectives = [n for n in _graph_nodes(first) if n.op.startswith("Collective")]
    assert len(collectives) == 2 * 4  # reduce, send or receive, gather, per replica
    assert all(n.attr["timeout_seconds"].f == 7.0 for n in collectives)
    shared, gathered = step(tf.ones([8, 2]))
    for got in strategy.experimental_local_results(shared):
        np.testing.assert_allclose(got, [32.0] * 3)
    for got in strategy.experimental_local_results(gathered):
        np.testing.assert_allclose(got, [[1.0, 1.0]] * 2)


def test_stable_instance_keys_fit_int32_above_the_eager_counter():
    from kfac_dist.strategies.collective import stable_instance_key

    keys = {stable_instance_key(f"step/all_reduce/float32/[{n}]#0") for n in range(1000)}
    assert len(keys) == 1000
    assert all(2**30 <= key < 2**31 for key in keys)
    assert stable_instance_key("a") == stable_instance_key("a")


def test_kfac_collective_timeout_reaches_the_context_and_is_checked():
    import keras

    import kfac_dist as kfac

    strategy = mirrored(2)
    with strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        optimizer = kfac.Kfac(learning_rate=0.1, damping=0.1, model=model, collective_timeout=42)
    assert optimizer.context.timeout_seconds == 42.0
    assert optimizer.get_config()["collective_timeout"] == 42.0
    with pytest.raises(ValueError, match=r"collective_timeout must be > 0 seconds \(or None"):
        kfac.Kfac(learning_rate=0.1, damping=0.1, collective_timeout=0)
