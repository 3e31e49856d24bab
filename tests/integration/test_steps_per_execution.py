"""model.fit(steps_per_execution=k) trains as k=1 does: K-FAC's schedules count steps."""

import pytest
import tensorflow as tf

from tests.test_accumulation import (
    MICRO_BATCH,
    UPDATES,
    K,
    assert_same_state,
    data,
    first_replica,
    mirrored,
    state,
    train,
)

pytestmark = pytest.mark.usefixtures("float64")

# 15 steps in executions of 4 (the last one of 3); inverses every 2 steps.
SPE = 4


@pytest.mark.parametrize("replicas", [1, 2])
def test_steps_per_execution_trains_as_one_step_per_execution(replicas):
    x, y = data()
    strategy = mirrored() if replicas == 2 else tf.distribute.get_strategy()
    model, opt = train(strategy, MICRO_BATCH, x, y, steps_per_execution=SPE, invert_every=2)
    reference = train(strategy, MICRO_BATCH, x, y, invert_every=2)
    got, want = state(model, opt), state(*reference)
    assert want["counters"][0] == K * UPDATES
    assert_same_state(got, want)
    inversions = [first_replica(o, o.curvature.inversions) for o in (opt, reference[1])]
    assert inversions[0] == inversions[1] > 0


def test_steps_per_execution_with_accumulation_counts_updates_across_executions():
    x, y = data()
    one = tf.distribute.get_strategy()
    model, opt = train(
        one, MICRO_BATCH, x, y, steps_per_execution=SPE, gradient_accumulation_steps=K
    )
    reference = train(one, K * MICRO_BATCH, x, y)
    assert_same_state(state(model, opt), state(*reference))
