"""The full approximation: the whole (n, n) Fisher of a block's parameters (small blocks).

Above the block's `max_factor_dim` it is split: the k diagonal blocks of the
Fisher over k runs of consecutive parameters (`linalg.split_of`), each
damped by λ and inverted on its own.
"""

from __future__ import annotations

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.approximations.base import LayerKind, PerExample, max_factor_dim
from kfac_dist.options import FULL


class Full(PerExample):
    """One (n, n) factor over the block's n parameters, or its (k, m, m) diagonal blocks."""

    name = FULL

    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        return [self.name]

    def factor_splits(self, layer: LayerKind) -> list[linalg.Split | None]:
        return [linalg.split_of(layer.num_params, max_factor_dim(layer))]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        split = self.factor_splits(layer)[0]
        if split is None:
            return [(layer.num_params, layer.num_params)]
        return [(split.members, split.size, split.size)]

    def group_counts(self, layer: LayerKind) -> list[int | None]:
        split = self.factor_splits(layer)[0]
        return [None if split is None else split.members]

    def damping_rows(self, layer: LayerKind) -> list[list[int]]:
        """One row per diagonal block (each gets λ)."""
        return [[j] for j in range(linalg.member_count(self.group_counts(layer)[0]))]

    def second_moment(
        self, per_example: tf.Tensor, batch_size: tf.Tensor, split: linalg.Split | None = None
    ) -> tf.Tensor:
        if split is None:
            return tf.matmul(per_example, per_example, transpose_a=True) / batch_size
        blocks = linalg.split_rows(per_example, split)
        return tf.einsum("rka,rkb->kab", blocks, blocks) / batch_size
