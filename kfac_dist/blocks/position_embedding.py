"""keras-hub's PositionEmbedding: an embedding of the position ids, as EmbeddingBlock.

`keras_hub.layers.PositionEmbedding` holds a table P (sequence length L,
width H) and returns its rows start_index … start_index + T − 1 (or the
rows of explicit `positions`) broadcast to the input's shape, to be added
to the token embeddings: the output does not depend on the input's values.
That is an Embedding whose token ids are the positions, so its block is
EmbeddingBlock's pair, diag(position counts)/b ⊗ G: the recorded ids are
the positions each output row took, the recorded output the broadcast
rows. keras-hub is not imported here (the layer is read through its
attributes); registration adds the layer to `BLOCK_OF_LAYER` once
keras-hub is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.base import Block
from kfac_dist.blocks.embedding import EmbeddingBlock
from kfac_dist.blocks.records import Record


class PositionEmbeddingBlock(EmbeddingBlock):
    """K-FAC for `keras_hub.layers.PositionEmbedding`: diag(position counts) ⊗ G."""

    def __init__(self, layer: Any, approx: str | None = None):
        self._layer = layer
        Block.__init__(self, layer.name, [layer.position_embeddings], approx)

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        outputs = call(inputs, *args, **kwargs)
        shape = tf.shape(outputs)[:-1]  # the input's shape but its features
        positions = kwargs.get("positions", args[1] if len(args) > 1 else None)
        if positions is None:
            start = kwargs.get("start_index", args[0] if args else 0)
            length = tf.shape(outputs)[-2]
            positions = tf.range(length) + tf.cast(start, tf.int32)
        ids = tf.broadcast_to(tf.cast(positions, tf.int32), shape)
        return outputs, Record(inputs=ids, outputs=outputs)
