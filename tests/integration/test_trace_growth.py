"""The traced step grows with the number of factor shapes, not of blocks (trace time).

Under MirroredStrategy each replica traces only the inversions it owns, and
factors of one shape share one batched Cholesky and one retry loop: a deeper
stack of equal Dense layers adds no inversion op to the graph.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kfac_dist as kfac
from tests.collectives import count_ops

RNG = np.random.default_rng(0)
X = RNG.normal(size=(16, 4)).astype("float32")
Y = RNG.normal(size=(16, 4)).astype("float32")
INVERSION_OPS = {"Cholesky", "MatrixTriangularSolve", "While", "StatelessWhile"}


def inversion_ops(depth: int, placement) -> int:
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    with strategy.scope():
        keras.utils.set_random_seed(0)
        # Every block has a 5×5 A and a 4×4 G: two factor shapes.
        model = keras.Sequential(
            [keras.Input((4,))] + [keras.layers.Dense(4, activation="tanh") for _ in range(depth)]
        )
        opt = kfac.Kfac(
            learning_rate=0.01, damping=0.25, model=model, loss="mse", placement=placement
        )
        model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    return count_ops(model.train_function, INVERSION_OPS)


@pytest.mark.parametrize("placement", ["round_robin", "replicated"])
def test_inversion_ops_do_not_grow_with_the_number_of_equal_blocks(placement):
    assert inversion_ops(2, placement) == inversion_ops(6, placement) > 0


class InputsOnFirstReplica:
    """Every A (even units) to replica 0, every G to replica 1."""

    def assign(self, costs, num_replicas):
        return [k % 2 for k in range(len(costs))]


def test_each_replica_traces_only_the_inversions_it_owns():
    # Each replica owns one factor shape: its graph inverts that shape only,
    # where "replicated" has every replica invert both.
    assert 2 * inversion_ops(4, InputsOnFirstReplica()) == inversion_ops(4, "replicated")
