"""A diagonal block for arbitrary variables (unsupported layers, manual registration).

Per-example gradients of arbitrary variables are not available from one
backward pass, but the pseudo-loss carries an independent random sign per
example: cross terms between examples vanish in expectation, so
(1/b)·(Σ_i r_i ĝ_i)² is an unbiased estimate of the diagonal Fisher
(1/b)·Σ_i ĝ_i², obtained from the variables' ordinary gradient. That is
this kind's own statistic; preconditioning is the diagonal approximation's.
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
