"""The diagonal approximation: diag(F), the mean squared per-example gradient of each parameter."""

from __future__ import annotations

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.approximations.base import LayerKind, PerExample
from kfac_dist.options import DIAGONAL


class Diagonal(PerExample):
    """One (n,) factor over the block's n parameters."""

    name = DIAGONAL

    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        return [self.name]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        return [(layer.num_params,)]

    def second_moment(
        self, per_example: tf.Tensor, batch_size: tf.Tensor, split: linalg.Split | None = None
    ) -> tf.Tensor:
        """Never split: a diagonal factor costs no more than its gradient."""
        return tf.reduce_sum(tf.square(per_example), axis=0) / batch_size
