"""A diagonal block for arbitrary variables (unsupported layers, manual registration).

Per-example gradients of arbitrary variables are not available from one
backward pass, but the pseudo-loss carries an independent random sign per
example: cross terms between examples vanish in expectation, so
(1/b)·(Σ_i r_i ĝ_i)² is an unbiased estimate of the diagonal Fisher
(1/b)·Σ_i ĝ_i², obtained from the variables' ordinary gradient. That is
this kind's own statistic; preconditioning is the diagonal approximation's.

It is an estimate, noisier than the exact diagonal: each entry's cross
terms r_i r_j ĝ_i ĝ_j (i ≠ j) have mean zero but do not cancel in one
batch, so a step's value can be far from its mean (never negative); the
factor's moving average over steps is what makes it usable. For one
example (b = 1) it is exact. `signed_gradient_diagonal` gives the same
estimate for a layer block (a convolution under fisher_approx="diagonal"),
whose exact diagonal would need every example's gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.base import DIAGONAL, Block
from kfac_dist.blocks.records import Record
from kfac_dist.linalg import curvature_dtype


class GenericDiagonalBlock(Block):
    """Diagonal Fisher of any variables, from signed batch gradients."""

    approximations = (DIAGONAL,)

    def __init__(self, name: str, variables: Sequence[Any], approx: str | None = None):
        super().__init__(name, variables, approx)

    def statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        # `output_grads` are the variables' gradients, one (C, *shape) per variable.
        flat = tf.concat(
            [tf.reshape(tf.cast(g, curvature_dtype()), [g.shape[0], -1]) for g in output_grads],
            axis=1,
        )
        return [tf.reduce_sum(tf.square(flat), axis=0) / tf.cast(batch_size, curvature_dtype())]


def signed_gradient_diagonal(
    block: Block,
    records: Sequence[Record],
    output_grads: Sequence[tf.Tensor],
    batch_size: tf.Tensor | int,
) -> tf.Tensor:
    """(1/b) Σ_c (∂/∂θ Σ_r ⟨s_r(θ), g_{r,c}⟩)², the generic estimate, for a layer block.

    The layer is run again on each recorded input (its pre-activation
    s_r(θ), activation set aside) and differentiated at its variables: one
    forward and one weight-gradient pass, O(parameters) memory, however
    many positions an example has. Unbiased for the diagonal Fisher (see
    the module docstring), not exact.
    """
    dtype = curvature_dtype()
    columns = int(output_grads[0].shape[0])
    with tf.GradientTape(persistent=columns > 1) as tape:
        outputs = [block.record(block.layer.call, r.inputs)[1].outputs for r in records]
        pseudo = [
            tf.add_n(
                [
                    tf.reduce_sum(tf.cast(s, dtype) * tf.cast(g[c], dtype))
                    for s, g in zip(outputs, output_grads)
                ]
            )
            for c in range(columns)
        ]
    squares = []
    for p in pseudo:
        grads = tape.gradient(p, block.variables, unconnected_gradients="zero")
        squares.append(
            tf.concat([tf.reshape(tf.square(tf.cast(g, dtype)), [-1]) for g in grads], 0)
        )
    total = squares[0] if len(squares) == 1 else tf.add_n(squares)
    return total / tf.cast(batch_size, dtype)
