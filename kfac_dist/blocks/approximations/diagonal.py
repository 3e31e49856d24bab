"""The diagonal approximation: diag(F), the mean squared per-example gradient of each parameter.

A layer kind with `diagonal_statistics(records, output_grads, batch_size)`
computes the diagonal itself, exactly and without the (C·b, parameters)
per-example tensor (the Dense block: (ā²)ᵀ(g²) for a layer without
positions; the conv blocks: per-example products squared one kernel
offset at a time); any other has it from its per-example gradients.
The generic block for unsupported layers has its own statistic, an
unbiased estimate (blocks/diagonal.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks.approximations.base import LayerKind, PerExample
from kfac_dist.blocks.records import Record
from kfac_dist.options import DIAGONAL


class Diagonal(PerExample):
    """One (n,) factor over the block's n parameters."""

    name = DIAGONAL

    def factor_names(self, layer: LayerKind | None = None) -> list[str]:
        return [self.name]

    def factor_shapes(self, layer: LayerKind) -> list[tuple[int, ...]]:
        return [(layer.num_params,)]

    def statistics(
        self,
        layer: LayerKind,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """(1/b) Σ ĝ² (weights ride on the pseudo-loss), from the layer kind's own diagonal."""
        own = getattr(layer, "diagonal_statistics", None)
        if own is None:
            return super().statistics(layer, records, output_grads, batch_size, example_weights)
        return [own(records, output_grads, batch_size)]

    def second_moment(
        self, per_example: tf.Tensor, batch_size: tf.Tensor, split: linalg.Split | None = None
    ) -> tf.Tensor:
        """Never split: a diagonal factor costs no more than its gradient."""
        return tf.reduce_sum(tf.square(per_example), axis=0) / batch_size
