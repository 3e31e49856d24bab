"""Gradient accumulation: k micro-batches applied as one K-FAC step on their union.

Keras' own accumulation cannot serve K-FAC: it sums the gradients only, and
it gates the update with a `cond` around `merge_call`, which TensorFlow 2.21
refuses under MirroredStrategy ("merge_call called while defining a new
graph"), even for SGD. Here each replica sums, with no communication, its
micro-batches' gradients (in Keras' own `gradient_accumulator` variables,
written by the update's one `merge_call`, which runs on every call) and
curvature statistics weighted by their example counts (`StatisticSums`).
The k-th call hands their means to the K-FAC update, which all-reduces the
gradients once, folds once and inverts on schedule. Batch statistics are
means over examples and the factors are normalised by example totals, so
Σᵢ bᵢ·Fᵢ / Σᵢ bᵢ with the summed weights is exactly the statistic of the
k-times larger batch, and so are the mean gradients (Keras' losses average
over each micro-batch of equal size).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import tensorflow as tf

from kfac_dist.curvature import BatchStatistics, Curvature


class StatisticSums:
    """Σᵢ bᵢ·Fᵢ and Σᵢ [bᵢ, Σwᵢ] over one update's micro-batches, per replica."""

    def __init__(self, curvature: Curvature, add_variable: Callable[..., keras.Variable]) -> None:
        # One sum per factor, as the statistics come.
        self.sums = [
            add_variable(tuple(total.shape), f"statistics_{i}_accumulated")
            for i, total in enumerate(curvature.factor_sums)
        ]
        self.weights = add_variable((2,), "weight_accumulated")

    def add(self, batch: BatchStatistics) -> BatchStatistics:
        """Adds one micro-batch; returns the statistics of all added so far.

        A non-finite micro-batch makes the total non-finite, so the whole
        update is skipped (as one large batch with that value would be).
        """
        examples = batch.weights[0]
        for total, statistic in zip(self.sums, batch.statistics):
            total.assign_add(examples * statistic)
        self.weights.assign_add(batch.weights)
        all_examples = self.weights[0]
        means = [tf.math.divide_no_nan(total.value, all_examples) for total in self.sums]
        sums = [total.value for total in self.sums]
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(s)) for s in sums])
        return BatchStatistics(means, self.weights.value, finite)

    def reset(self) -> None:
        for total in (*self.sums, self.weights):
            total.assign(tf.zeros_like(total))
