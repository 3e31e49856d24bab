"""Dynamic loss scaling (mixed_float16) in K-FAC's step, decided on values every replica shares.

Under the mixed_float16 policy `compile` wraps the optimizer in Keras'
`LossScaleOptimizer`. Its own `apply` decides whether to skip a step on each
replica's local gradients, before the optimizer's all-reduce: replicas can
decide differently, and K-FAC's collectives would then wait forever. K-FAC's
step keeps the wrapper's state and rules (the loss times the scale s, the
gradients divided by it, s halved on a rejected step and doubled after
`dynamic_growth_steps` finite ones) but decides after the one gradient
all-reduce, which carries every replica's finiteness: a step is rejected when
any replica's gradients or curvature statistics are not finite.

The pseudo-loss whose gradients give the curvature is not scaled. The loss is
a mean over the batch, so its float16 backward signals are per-example
gradients divided by b, which underflow; the pseudo-loss is a sum over
examples whose vectors carry the square root of each example's loss weight
(G is quadratic in them, see `OutputLoss.vectors`), so its signals are
per-example and O(√c): inside float16's normal range for any loss weight
c > 1e-8. Scaled by s (2¹⁵ at the start) they would overflow float16 and
drag the loss scale down for the curvature's sake. Its statistics therefore
need no unscaling and do not depend on s.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def inner_optimizer(
    optimizer: keras.optimizers.Optimizer | None,
) -> keras.optimizers.Optimizer | None:
    """The optimizer a `LossScaleOptimizer` wraps, or `optimizer` itself."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer


def loss_scale(optimizer: keras.optimizers.Optimizer) -> tf.Tensor | None:
    """This step's loss scale (float32), or None when the optimizer scales no loss."""
    if not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return None
    return tf.convert_to_tensor(optimizer.dynamic_scale)


def finish_step(optimizer: keras.optimizers.LossScaleOptimizer, finite: tf.Tensor) -> None:
    """The wrapper's rules on the all-reduced decision `finite` (identical on every replica).

    A rejected step is no step: Keras' `apply` has counted it, but
    `LossScaleOptimizer` never calls its inner optimizer then, so the count
    is taken back, and K-FAC's schedules (statistics, inverses, the sampling
    seed) and the learning-rate schedule do not advance.
    """
    counter = tf.convert_to_tensor(optimizer.step_counter)
    grow = tf.logical_and(finite, tf.equal(counter, optimizer.dynamic_growth_steps - 1))
    count = tf.logical_and(finite, tf.logical_not(grow))
    optimizer.step_counter.assign(tf.where(count, counter + 1, tf.zeros_like(counter)))
    scale = optimizer.dynamic_scale
    scale.assign(scale * tf.where(grow, 2.0, tf.where(finite, 1.0, 0.5)))
    iterations = optimizer.inner_optimizer.iterations
    iterations.assign_sub(tf.cast(tf.logical_not(finite), iterations.dtype))
