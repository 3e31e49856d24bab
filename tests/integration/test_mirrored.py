"""Kfac under MirroredStrategy over logical CPUs: equivalence, placement, budget."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from kfac_dist import strategies
from tests.collectives import count_collectives

STEPS = 20
GLOBAL_BATCH = 16
INVERT_EVERY = 5
RNG = np.random.default_rng(1)
X = RNG.normal(size=(STEPS * GLOBAL_BATCH, 5)).astype("float32")
Y = RNG.integers(0, 3, size=STEPS * GLOBAL_BATCH)


def strategy_of(num_replicas: int) -> tf.distribute.Strategy:
    if num_replicas == 1:
        return tf.distribute.get_strategy()
    # The strategy's own collectives use group key 1 for any device set, so
    # 2- and 4-replica strategies cannot both use them in one process.
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(num_replicas)],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def mlp() -> keras.Model:
    keras.utils.set_random_seed(7)
    return keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh"),
            keras.layers.Dense(3, activation="softmax"),
        ]
    )


def build(num_replicas: int, **kfac_args):
    with strategy_of(num_replicas).scope():
        model = mlp()
        args = dict(
            learning_rate=0.2,
            damping=0.05,
            momentum=0.9,
            norm_constraint=1e-3,  # the KL clip of a momentum step engages
            model=model,
            loss="sparse_categorical_crossentropy",
            estimation_mode="exact",
            invert_every=INVERT_EVERY,
            seed=3,
        )
        args.update(kfac_args)
        opt = kfac.Kfac(**args)
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    return model, opt


@functools.cache
def trained(
    num_replicas: int,
    placement: str = "round_robin",
    factor_sync: str = "lazy",
    sharing: str = "auto",
):
    model, opt = build(
        num_replicas, placement=placement, factor_sync=factor_sync, inverse_sharing=sharing
    )
    model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model, opt


CASES = [
    (n, p, s, "auto")
    for n in (2, 4)
    for p in ("round_robin", "balanced", "replicated")
    for s in ("lazy", "every_update")
] + [
    (2, "round_robin", "lazy", "all_gather"),
    (4, "balanced", "lazy", "all_gather"),
    (4, "round_robin", "every_update", "all_gather"),
    (4, "balanced", "lazy", "all_reduce"),
    (2, "round_robin", "lazy", "broadcast"),
    (4, "balanced", "every_update", "broadcast"),
]


@pytest.mark.parametrize("num_replicas, placement, factor_sync, sharing", CASES)
def test_replicas_train_like_one_replica_on_the_global_batch(
    num_replicas, placement, factor_sync, sharing
):
    reference, _ = trained(1)
    model, opt = trained(num_replicas, placement, factor_sync, sharing)
    if placement == "replicated":
        assert opt.curvature.sharing_method is None
    elif sharing != "auto":
        assert opt.curvature.sharing_method == sharing
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_replicas, placement, factor_sync, sharing", CASES)
def test_communication_budget_per_step(num_replicas, placement, factor_sync, sharing):
    _, opt = trained(num_replicas, placement, factor_sync, sharing)
    inverse_updates = -(-STEPS // INVERT_EVERY)
    sharing_bytes = opt.curvature.sharing.sent
    for replica in range(num_replicas):
        counts = opt.context.counts(replica)
        assert counts[strategies.GRADIENTS]["calls"] == STEPS
        expected_syncs = STEPS if factor_sync == "every_update" else inverse_updates
        assert counts[strategies.FACTOR_SYNC]["calls"] == expected_syncs
        shared = opt.curvature.shared_units
        if sharing == "broadcast":  # one packed buffer per owner
            own = [u for u in shared if opt.curvature.plan.owners[u] == replica]
            own_bytes = sum(opt.curvature.units[u].result_floats("cholesky") * 4 for u in own)
            owners = {opt.curvature.plan.owners[u] for u in shared}
            assert opt.curvature.sharing.collectives == len(owners) <= len(shared)
            assert counts[strategies.INVERSE_SHARE]["calls"] == len(owners) * inverse_updates
            assert counts[strategies.INVERSE_SHARE]["bytes"] == own_bytes * inverse_updates
            continue
        expected_shares = 0 if placement == "replicated" else inverse_updates
        assert counts[strategies.INVERSE_SHARE]["calls"] == expected_shares
        assert counts[strategies.INVERSE_SHARE]["bytes"] == expected_shares * sharing_bytes
        assert counts[strategies.ADAPTIVE]["calls"] == 0


@functools.cache
def adam_collectives(num_replicas: int):
    with strategy_of(num_replicas).scope():
        model = mlp()
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return count_collectives(model.train_function).per_replica(num_replicas)


@pytest.mark.parametrize(
    "num_replicas, placement, factor_sync, sharing",
    [
        (1, "round_robin", "lazy", "auto"),
        (2, "round_robin", "lazy", "auto"),
        (2, "replicated", "lazy", "auto"),
        (2, "round_robin", "lazy", "broadcast"),
        (4, "balanced", "lazy", "all_gather"),
        (4, "balanced", "lazy", "all_reduce"),
        (4, "balanced", "every_update", "broadcast"),
    ],
)
def test_traced_graph_has_adams_collectives_per_step_and_one_sync_and_sharing_per_inverse_update(
    num_replicas, placement, factor_sync, sharing
):
    model, opt = trained(num_replicas, placement, factor_sync, sharing)
    got = count_collectives(model.train_function).per_replica(num_replicas)
    adam = adam_collectives(num_replicas)
    assert adam.per_inverse_update == 0
    every_step_sync = int(factor_sync == "every_update" and num_replicas > 1)
    assert got.per_step == adam.per_step + every_step_sync
    sync = int(factor_sync == "lazy" and num_replicas > 1)
    assert got.per_inverse_update == sync + opt.curvature.sharing.collectives
    if num_replicas > 1 and placement != "replicated":
        assert opt.curvature.sharing.collectives >= 1


@functools.cache
def trained_staggered(num_replicas: int, placement: str = "round_robin", sharing: str = "auto"):
    model, opt = build(
        num_replicas, placement=placement, inverse_sharing=sharing, stagger_inverses=True
    )
    history = []
    for step in range(STEPS):
        batch = slice(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
        model.fit(X[batch], Y[batch], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        history.append([v.numpy().copy() for p in opt.curvature.payloads for v in p])
    return model, opt, history


@pytest.mark.parametrize(
    "num_replicas, placement, sharing",
    [(2, "round_robin", "auto"), (4, "balanced", "auto"), (2, "round_robin", "broadcast")],
)
def test_staggered_inverses_train_like_one_replica_with_the_same_inverses_at_each_step(
    num_replicas, placement, sharing
):
    reference, ref_opt, ref_history = trained_staggered(1)
    model, opt, history = trained_staggered(num_replicas, placement, sharing)
    assert opt.curvature.plan.slots == ref_opt.curvature.plan.slots
    for got, want in zip(history, ref_history):
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_staggered_inverses_invert_each_unit_at_its_slot_and_all_at_the_first_step():
    _, opt, history = trained_staggered(2)
    plan = opt.curvature.plan
    # One slot per unit here (fewer units than steps in the period).
    assert plan.num_slots == min(INVERT_EVERY, len(plan.units)) and len(set(plan.slots)) > 1
    payload_units = [u for u, p in enumerate(opt.curvature.payloads) for _ in p]
    first = history[0]
    assert all(np.any(p != 0) for p in first)  # every unit at the first step
    for step in range(1, STEPS):
        changed = {
            u
            for u, before, after in zip(payload_units, history[step - 1], history[step])
            if not np.array_equal(before, after)
        }
        slot = step % INVERT_EVERY
        assert changed == (set(plan.in_slot(slot)) if slot < plan.num_slots else set())
    # Each replica inverted its own units of each slot: none twice, none missed.
    computed = opt.context.strategy.experimental_local_results(opt.curvature.inversions.value)
    per_period = len(plan.units) * (1 + (STEPS - 1) // INVERT_EVERY)
    assert sum(int(c) for c in computed) >= per_period


def test_staggered_graph_has_adams_collectives_per_step_and_one_slot_sync_and_sharing():
    model, opt, _ = trained_staggered(2)
    got = count_collectives(model.train_function).per_replica(2)
    adam = adam_collectives(2)
    assert got.per_step == adam.per_step
    # The busiest step (the first: every unit) syncs in one chunk and shares once.
    assert got.per_inverse_update == 1 + opt.curvature.sharing.collectives
    counts = opt.context.counts(0)
    # Every step syncs its slot, but the steps of the period past the last slot.
    idle = sum(1 for step in range(1, STEPS) if step % INVERT_EVERY >= opt.curvature.plan.num_slots)
    assert counts[strategies.FACTOR_SYNC]["calls"] == STEPS - idle
    report = opt.placement_report()
    assert f"spread over {opt.curvature.plan.num_slots} steps of each inverse period" in report
    info = opt.placement_report(as_dict=True)
    assert [u["slot"] for u in info["units"]] == list(opt.curvature.plan.slots)


@functools.cache
def trained_distributed(num_replicas: int, replication: float, stagger: bool = False):
    model, opt = build(num_replicas, inverse_replication=replication, stagger_inverses=stagger)
    model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return model, opt


DISTRIBUTED = [(2, 0.0, False), (4, 0.0, False), (4, 0.5, True), (2, 0.0, True)]


@pytest.mark.parametrize("num_replicas, replication, stagger", DISTRIBUTED)
def test_distributed_preconditioning_trains_like_one_replica(num_replicas, replication, stagger):
    reference, _ = trained_distributed(1, 1.0, stagger)
    model, opt = trained_distributed(num_replicas, replication, stagger)
    distributed = opt.curvature.distributed
    assert distributed.active
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("num_replicas, replication, stagger", DISTRIBUTED)
def test_distributed_inverses_are_held_by_their_owner_alone(num_replicas, replication, stagger):
    _, opt = trained_distributed(num_replicas, replication, stagger)
    curvature = opt.curvature
    distributed = curvature.distributed
    _, everywhere = trained_distributed(1, 1.0, stagger)
    total = sum(v.shape.num_elements() for p in everywhere.curvature.payloads for v in p)
    # No payload variable for a distributed unit; each replica's buffer is
    # its own units' payloads, within the bound the option sets.
    for unit, owner in distributed.unit_owners.items():
        assert curvature.payloads[unit] == []
        assert curvature.plan.owners[unit] == owner
    replicated = sum(v.shape.num_elements() for p in curvature.payloads for v in p)
    bound = replication * total + (1 - replication) * total / num_replicas
    slices = everywhere.curvature.block_factor_slices()
    largest_block = max(
        sum(v.shape.num_elements() for p in everywhere.curvature.payloads[s] for v in p)
        for s in slices
    )
    for replica in range(num_replicas):
        # The bound, unless one block alone exceeds it (it cannot be split).
        assert replicated + distributed.held_floats(replica) <= max(bound, largest_block)
    assert replicated + distributed.size < total
    held = opt.context.strategy.experimental_local_results(distributed.held)
    holders = [r for r in range(num_replicas) if distributed.held_floats(r)]
    assert len(holders) == len(set(distributed.owners.values())) >= 1
    for replica in holders:
        own = held[replica].numpy()[: distributed.held_floats(replica)]
        assert np.all(np.isfinite(own)) and np.any(own != 0)
    info = opt.placement_report(as_dict=True)
    params = sum(curvature.blocks[b].num_params for b in distributed.owners)
    assert info["bytes_per_step_preconditioned"] == 4 * (params + 1)
    assert info["replicas"][0]["memory"]["inverses"] == 4 * (replicated + distributed.size)
    assert "distributed preconditioning" in opt.placement_report()


@pytest.mark.parametrize("num_replicas, replication, stagger", DISTRIBUTED[:2])
def test_distributed_preconditioning_adds_one_all_reduce_per_step(
    num_replicas, replication, stagger
):
    model, opt = trained_distributed(num_replicas, replication, stagger)
    got = count_collectives(model.train_function).per_replica(num_replicas)
    adam = adam_collectives(num_replicas)
    assert got.per_step == adam.per_step + 1
    assert got.per_inverse_update == 1 + opt.curvature.sharing.collectives * bool(
        opt.curvature.shared_units
    )
    counts = opt.context.counts(0)
    assert counts[strategies.PRECONDITIONED]["calls"] == STEPS
    info = opt.placement_report(as_dict=True)
    assert (
        counts[strategies.PRECONDITIONED]["bytes"] == STEPS * info["bytes_per_step_preconditioned"]
    )


def test_a_fresh_process_recomputes_the_distributed_inverses_at_its_first_step():
    model, opt = build(2, inverse_replication=0.0)
    model.fit(X[:32], Y[:32], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    distributed = opt.curvature.distributed
    strategy = model.distribute_strategy
    # What a restore leaves: no held inverses (they are not saved), not ready.
    for local in strategy.experimental_local_results(distributed.held):
        local.assign(tf.zeros_like(local))
    for local in strategy.experimental_local_results(distributed.ready):
        local.assign(False)
    inversions = [
        int(c) for c in strategy.experimental_local_results(opt.curvature.inversions.value)
    ]
    assert int(opt.iterations.numpy()) % INVERT_EVERY != 0  # not an inverse step by schedule
    model.fit(X[32:48], Y[32:48], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    after = [int(c) for c in strategy.experimental_local_results(opt.curvature.inversions.value)]
    for replica in range(2):
        owned = len(opt.curvature.plan.owned_by(replica))
        assert after[replica] == inversions[replica] + owned
        buffer = strategy.experimental_local_results(distributed.held)[replica].numpy()
        assert np.any(buffer[: distributed.held_floats(replica)] != 0)
    assert all(bool(r) for r in strategy.experimental_local_results(distributed.ready))
    # The buffer is not part of what is saved.
    saved = {v.path for v in opt.variables}
    assert not any("held" in path for path in saved)


def test_all_gather_sends_fewer_bytes_than_all_reduce_when_padding_is_small():
    _, gather = trained(4, "balanced", "lazy", "all_gather")
    _, reduce = trained(4, "balanced", "lazy", "all_reduce")
    assert gather.curvature.sharing.sent < reduce.curvature.sharing.sent


@pytest.mark.parametrize(
    "num_replicas, placement", [(2, "round_robin"), (4, "balanced"), (2, "replicated")]
)
def test_each_replica_inverts_only_the_factors_it_owns(num_replicas, placement):
    _, opt = trained(num_replicas, placement)
    plan = opt.curvature.plan
    inverse_updates = -(-STEPS // INVERT_EVERY)
    computed = opt.context.strategy.experimental_local_results(opt.curvature.inversions.value)
    for replica in range(num_replicas):
        owned = len(plan.owned_by(replica)) + len(plan.replicated())
        assert int(computed[replica]) == owned * inverse_updates
    if placement != "replicated":
        assert sum(int(c) for c in computed) == len(plan.units) * inverse_updates


def test_factors_identical_on_replicas_after_sync_and_extra_sync_is_noop():
    model, opt = trained(2)
    strategy = model.distribute_strategy
    curvature = opt.curvature

    @tf.function(autograph=False)
    def sync_twice():
        def step():
            curvature.sync()
            first = [tf.identity(v.value) for v in curvature.factor_sums]
            curvature.sync()
            second = [tf.identity(v.value) for v in curvature.factor_sums]
            return first, second

        return strategy.run(step)

    first, second = sync_twice()
    for a, b in zip(first, second):
        local_a = strategy.experimental_local_results(a)
        local_b = strategy.experimental_local_results(b)
        np.testing.assert_allclose(local_a[0], local_a[1], rtol=1e-6)
        np.testing.assert_allclose(local_a[0], local_b[0], rtol=1e-6)


def test_a_nonfinite_sync_keeps_every_replicas_own_sums_and_the_inverses():
    model, opt = build(2, invert_every=1)
    model.fit(X[:64], Y[:64], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    strategy = model.distribute_strategy
    curvature = opt.curvature
    inverses = [v.numpy().copy() for p in curvature.payloads for v in p]
    skipped = int(curvature.skipped_statistics.numpy())

    @tf.function(autograph=False)
    def overflow_then_update():
        def step():
            # Finite on each replica (different on each), infinite once summed.
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            curvature.factor_sums[0].assign(
                tf.fill(curvature.factor_sums[0].shape, 2e38 + 1e37 * tf.cast(replica, tf.float32))
            )
            local = [tf.identity(v.value) for v in curvature.factor_sums]
            with tf.control_dependencies(local):
                curvature.update_inverses(opt.damping_value())
            return local, [tf.identity(v.value) for v in curvature.factor_sums]

        return strategy.run(step)

    before, after = overflow_then_update()
    # The chunk that overflowed is not written: each replica keeps its own
    # sums, whose total is unchanged; no inverse is computed from them.
    for b, a in zip(before, after):
        for local_b, local_a in zip(
            strategy.experimental_local_results(b), strategy.experimental_local_results(a)
        ):
            np.testing.assert_array_equal(local_a.numpy(), local_b.numpy())
    got = [v.numpy() for p in curvature.payloads for v in p]
    for g, want in zip(got, inverses):
        np.testing.assert_array_equal(g, want)
    assert int(curvature.skipped_statistics.numpy()) == skipped + 1


def test_a_chunked_factor_sync_equals_one_collective_and_counts_each_chunk():
    model, opt = build(2, invert_every=1)
    model.fit(X[:64], Y[:64], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    strategy = model.distribute_strategy
    curvature = opt.curvature
    wire = [curvature._wire_floats(f) * 4 for f in range(len(curvature.factor_sums))]
    curvature.sync_chunk_bytes = max(wire)  # about one factor per chunk
    chunks = curvature._sync_chunks(range(len(wire)))
    assert len(chunks) > 2 and [f for c in chunks for f in c] == list(range(len(wire)))
    assert curvature.largest_sync_chunk_bytes <= max(wire) + 8

    @tf.function(autograph=False)
    def scatter_then_sync():
        def step():
            replica = tf.cast(
                tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32
            )
            for v in curvature.factor_sums:
                v.assign(v * (1.0 + replica))
            curvature.sync()
            return [tf.identity(v.value) for v in curvature.factor_sums]

        return strategy.run(step)

    before = [v.numpy().copy() for v in curvature.factor_sums]  # replica 0's, synced
    calls = opt.context.counts(0)["factor_sync"]["calls"]
    synced = scatter_then_sync()
    assert opt.context.counts(0)["factor_sync"]["calls"] == calls + len(chunks)
    for value, want in zip(synced, before):
        for local in strategy.experimental_local_results(value):
            np.testing.assert_allclose(local.numpy(), want * 1.5, rtol=1e-6)


def test_uneven_replica_batches_give_the_global_batch_factors():
    # 4 even global batches, then 9 examples: replicas see 5 and 4.
    x, y = X[: 4 * GLOBAL_BATCH + 9], Y[: 4 * GLOBAL_BATCH + 9]
    factors = []
    for num_replicas in (1, 2):
        model, opt = build(num_replicas, invert_every=1, cov_ema_decay=0.5)
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        sync = opt.curvature.sync
        tf.function(
            lambda sync=sync, strategy=model.distribute_strategy: strategy.run(sync),
            autograph=False,
        )()
        factors.append(opt.curvature.factors())
    for one, two in zip(*factors):
        np.testing.assert_allclose(np.asarray(two), np.asarray(one), rtol=1e-5, atol=1e-7)


class Scale(keras.layers.Layer):
    """A layer K-FAC does not know: registered with a generic diagonal block."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.scale


def every_block_kind(num_replicas: int):
    """One model with a block of each kind, in float64, with exact curvature."""
    strategy = (
        tf.distribute.get_strategy()
        if num_replicas == 1
        else tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(num_replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    )
    with strategy.scope():
        keras.utils.set_random_seed(5)
        ids = keras.Input((3,), dtype="int32")
        image = keras.Input((4, 4, 1))
        embedded = keras.layers.Flatten()(keras.layers.Embedding(7, 3)(ids))
        conv = keras.layers.Flatten()(keras.layers.Conv2D(2, 3, activation="tanh")(image))
        hidden = keras.layers.LayerNormalization()(keras.layers.Concatenate()([embedded, conv]))
        hidden = Scale()(keras.layers.Dense(4, activation="tanh")(hidden))
        model = keras.Model([ids, image], keras.layers.Dense(3, activation="softmax")(hidden))
        # The generic diagonal block's estimate depends on how the batch is
        # split (signed sums per replica), and so would the weights: a tiny
        # step keeps them equal so that the factors can be compared.
        opt = kfac.Kfac(
            learning_rate=1e-9,
            damping=0.1,
            model=model,
            loss="sparse_categorical_crossentropy",
            estimation_mode="exact",
            unsupported_layers="diagonal",
            invert_every=100,
            cov_ema_decay=0.5,
            seed=3,
        )
        model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    return model, opt


def local_sums(opt) -> list[list[np.ndarray]]:
    """[replica][variable]: each replica's own factor sums and weight sums."""
    local = opt.context.strategy.experimental_local_results
    variables = [*opt.curvature.factor_sums, opt.curvature.weight_sum]
    per_variable = [[np.asarray(v) for v in local(var.value)] for var in variables]
    return [list(copies) for copies in zip(*per_variable)]


def synced_factors(model, opt) -> list[np.ndarray]:
    strategy = model.distribute_strategy
    tf.function(lambda: strategy.run(opt.curvature.sync), autograph=False)()
    return [np.asarray(f) for f in opt.curvature.factors()]


def fit_with_empty_last_replicas(num_replicas: int, x, y, weights):
    """Fits 3 global batches of 8, then one of 2: replicas 2 and 3 get none.

    Returns the optimizer, the history and each replica's sums before and
    after the last batch.
    """
    model, opt = every_block_kind(num_replicas)
    before = []
    snapshot = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: before.append(local_sums(opt))
    )
    history = model.fit(
        x, y, sample_weight=weights, batch_size=8, shuffle=False, verbose=0, callbacks=[snapshot]
    )
    return model, opt, history, before[2], local_sums(opt)


def test_empty_replicas_decay_their_sums_and_factors_match_one_replica_every_block_kind():
    # In float64 the factors compare at 1e-6.
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        rng = np.random.default_rng(4)
        n = 26
        x = [rng.integers(0, 7, size=(n, 3)).astype("int32"), rng.normal(size=(n, 4, 4, 1))]
        y, weights = rng.integers(0, 3, size=n), rng.uniform(0.5, 2.0, size=n)
        factors = []
        for num_replicas in (1, 4):
            model, opt, history, before, after = fit_with_empty_last_replicas(
                num_replicas, x, y, weights
            )
            kinds = {type(block).__name__ for block in opt.curvature.blocks}
            assert kinds == {
                "DenseBlock",
                "ConvBlock",
                "EmbeddingBlock",
                "ScaleShiftBlock",
                "GenericDiagonalBlock",
            }
            assert history.history["nonfinite_skips"] == [0.0]
            for replica in range(2, num_replicas):  # no example: S ← εS, W ← εW
                for got, old in zip(after[replica], before[replica]):
                    np.testing.assert_allclose(got, 0.5 * old, rtol=1e-12, atol=0)
            factors.append(synced_factors(model, opt))
        # Every kind but the generic diagonal, whose signed estimate differs
        # with the split; its empty replicas' decay is checked above.
        generic = {b.name for b in opt.curvature.blocks if type(b).__name__.startswith("Generic")}
        for unit, one, four in zip(opt.curvature.units, *factors):
            if unit.block not in generic:
                np.testing.assert_allclose(four, one, rtol=1e-6, atol=1e-12, err_msg=unit.name)
    finally:
        keras.config.set_floatx("float32")
        keras.config.set_dtype_policy("float32")


def test_nonfinite_statistics_on_one_replica_skip_the_step_on_every_replica():
    # A huge input on replica 0 saturates tanh: its gradients stay finite, its
    # input factor overflows. Every replica must skip the fold and the update.
    model, opt = build(2, invert_every=100)
    model.fit(X[:32], Y[:32], batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    sums, weights = local_sums(opt), model.get_weights()
    bad = X[32:48].copy()
    bad[3, 1] = 1e20  # example 3 of 16: replica 0's half
    history = model.fit(bad, Y[32:48], batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    for replica_before, replica_after in zip(sums, local_sums(opt)):
        for want, got in zip(replica_before, replica_after):
            np.testing.assert_array_equal(got, want)
    for want, got in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert history.history["nonfinite_skips"] == [1.0]
    model.fit(X[:32], Y[:32], batch_size=GLOBAL_BATCH, shuffle=False, verbose=0)
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


def test_a_staggered_period_longer_than_the_run_inverts_once_and_costs_no_memory():
    # One slot per unit, not per step of the period: a period of 10**9 steps
    # is four slots here. The first step inverts every unit, steps 1-3 the
    # units of slots 1-3, and no later step of the period inverts anything.
    model, opt = build(1, stagger_inverses=True, invert_every=10**9)
    model.fit(X[:128], Y[:128], batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    plan = opt.curvature.plan
    assert plan.num_slots == len(plan.units) == 4
    later = sum(len(plan.in_slot(s)) for s in (1, 2, 3))
    assert int(opt.curvature.inversions.numpy()) == len(plan.units) + later
