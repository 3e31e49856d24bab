"""The full approximation: the whole (n, n) Fisher of a block's parameters (small blocks)."""

from __future__ import annotations

import tensorflow as tf

from kfac_dist.blocks.approximations.base import LayerKind, PerExample
from kfac_dist.options import FULL


class Full(PerExample):
    """One (n, n) factor over the block's n parameters."""

    name = FULL

    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        return [self.name]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        return [(layer.num_params, layer.num_params)]

    def second_moment(self, per_example: tf.Tensor, batch_size: tf.Tensor) -> tf.Tensor:
        return tf.matmul(per_example, per_example, transpose_a=True) / batch_size
