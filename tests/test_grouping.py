"""kfac_dist.grouping: equally shaped tensors as stacks, and back in order."""

import keras
import numpy as np
import tensorflow as tf

from kfac_dist import grouping


def test_groups_of_keeps_first_seen_order_within_and_across_groups():
    assert grouping.groups_of(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4], [3]]


def test_stacks_and_unstacked_round_trip_tensors_and_variables_of_mixed_shapes():
    values = [np.full((2, 2), 1.0), np.full((3,), 2.0), np.full((2, 2), 3.0)]
    variables = [keras.Variable(v, dtype="float32") for v in values]
    groups = grouping.shape_groups(variables)
    assert groups == [[0, 2], [1]]
    stacks = grouping.stacks(variables, groups)
    assert [tuple(s.shape) for s in stacks] == [(2, 2, 2), (1, 3)]
    back = grouping.unstacked(stacks, groups, len(values))
    for got, want in zip(back, values):
        np.testing.assert_array_equal(got.numpy(), want)
    assert grouping.shape_groups([tf.zeros([2], tf.float32), tf.zeros([2], tf.float64)]) == [
        [0],
        [1],
    ]


def test_chunks_by_bytes_cut_runs_at_the_limit_and_leave_a_larger_item_alone():
    assert grouping.chunks_by_bytes([5, 5, 20, 1, 1], 10) == [[0, 1], [2], [3, 4]]
    assert grouping.chunks_by_bytes([5, 5, 20, 1, 1], None) == [[0, 1, 2, 3, 4]]
    assert grouping.chunks_by_bytes([11], 10) == [[0]]
    assert grouping.chunks_by_bytes([], 10) == [[]]
