"""ReversibleEmbedding: one Kronecker pair for a table used as embedding and output projection.

`keras.layers.ReversibleEmbedding` (keras-hub's `keras_hub.layers.ReversibleEmbedding`
is the same class) embeds token ids with its table E (vocabulary V, width H)
and, called with `reverse=True`, projects hidden states back onto the
vocabulary: s = h Eᵀ (tied, the default) or s = h R with its own variable
R (H, V) (`tie_weights=False`), then `logit_soft_cap`·tanh(s / cap) when
the layer has a soft cap. Both uses are recorded (the capture records every
call; `reverse` tells them apart) and the recorded output of a reverse use
is s, before the soft cap, as a Dense block records its pre-activation.

In E's coordinates (V, H) every row of either use adds an outer product
u vᵀ to a gradient: an embedding row has u = the one-hot of its token and
v = g, the gradient at its embedding; a reverse row has u = g, the
gradient at its logits, and v = h, its hidden state. The block takes every
row of both uses as one more position of a single shared map, the "expand"
rule of Eschenhagen et al. 2023 for weight sharing (the shared dimension is
folded into the batch), which is also how DenseBlock treats a layer called
several times. With the scaling of `records.kron_factors` (the u side
summed over positions and divided by b, the v side averaged over all N
rows):

    vocabulary side  U = (1/b) [diag(token counts) + Σ_rev g gᵀ]
    hidden side      W = (1/N) [Σ_emb g gᵀ + Σ_rev h hᵀ]

and F ≈ U ⊗ W on vec(E) in row-major (V, H) order. Used only as an
embedding this is EmbeddingBlock exactly; used only in reverse it is
DenseBlock's pair for the kernel Eᵀ (the same product A ⊗ G, transposed),
so it is exact for a model linear in E under MSE. With both uses, the
single pair adds the cross terms diag(counts) ⊗ Σ h hᵀ and Σ g gᵀ ⊗ Σ g gᵀ
to the sum of the two uses' pairs; that is the price of one pair, invertible
at the cost of two factors. Keeping the sum of the two pairs exactly would
need a generalised eigenproblem of the hidden-side pair and, with a full
vocabulary side, of V × V matrices: not done.

Memory: GPT-2's vocabulary is 50,257, so a V × V factor is not an option by
default: the vocabulary side is diagonal (the counts plus the diagonal of
Σ g gᵀ), full only for vocabularies of at most FULL_VOCABULARY_MAX tokens or
on request (`vocab_factor="full"`; to make registration ask for it, put
`functools.partial(ReversibleEmbeddingBlock, vocab_factor="full")` in
`registration.BLOCK_OF_LAYER` for `keras.layers.ReversibleEmbedding`).

Untied (`tie_weights=False`): two variables, two Kronecker parts in one
block, each variable in one: "embedding" (E: the embedding rows alone,
EmbeddingBlock's pair) and "reverse" (R, as its transpose (V, H): the
reverse rows alone, DenseBlock's pair for the kernel R). Sample weights:
the vocabulary side is the weighted factor (counts are weighted, and the
logits' gradients carry the weights through the pseudo-loss), the hidden
states of reverse rows are weighted on the hidden side, so that each use's
product carries the weights as a Dense block's does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

from kfac_dist.blocks.approximations import KronPart
from kfac_dist.blocks.base import KRON, Block
from kfac_dist.blocks.records import Record, input_mask, row_weights, rows
from kfac_dist.linalg import curvature_dtype

#: The largest vocabulary whose side of the pair is full by default (a 512 × 512
#: factor is the size of a wide Dense layer's); larger ones are diagonal.
FULL_VOCABULARY_MAX = 512
VOCAB_FACTORS = ("diagonal", "full")


@dataclasses.dataclass
class UseRecord(Record):
    """A Record that says which use of the layer it is (`reverse`: the output projection)."""

    reverse: bool = False


class ReversibleEmbeddingBlock(Block):
    """K-FAC for `keras.layers.ReversibleEmbedding`: U ⊗ W over both uses of E (see module).

    Factors: A (the vocabulary side, (V,) or (V, V)) and G (the hidden side,
    (H, H)), or embedding_A/G and reverse_A/G when untied; variables
    [embeddings] or [embeddings, reverse_embeddings].
    """

    approximations = (KRON,)

    def __init__(self, layer: Any, approx: str | None = None, vocab_factor: str | None = None):
        self._layer = layer
        self.tied = bool(layer.tie_weights)
        variables = (
            [layer.embeddings] if self.tied else [layer.embeddings, layer.reverse_embeddings]
        )
        super().__init__(layer.name, variables, approx)
        self.vocabulary, self.width = (int(d) for d in layer.embeddings.shape)
        if vocab_factor is None:
            vocab_factor = "full" if self.vocabulary <= FULL_VOCABULARY_MAX else "diagonal"
        if vocab_factor not in VOCAB_FACTORS:
            raise ValueError(
                f"vocab_factor must be one of {VOCAB_FACTORS}, got {vocab_factor!r} "
                f"(block '{layer.name}')."
            )
        self.vocab_factor = vocab_factor

    @property
    def layer(self) -> Any:
        return self._layer

    @property
    def full_vocabulary(self) -> bool:
        return self.vocab_factor == "full"

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        reverse = bool(kwargs.get("reverse", args[0] if args else False))
        if not reverse:
            outputs = call(inputs, *args, **kwargs)
            return outputs, UseRecord(inputs=inputs, outputs=outputs)
        # The soft cap is the reverse use's activation: record the logits before it.
        cap = self._layer.logit_soft_cap
        self._layer.logit_soft_cap = None
        try:
            s = call(inputs, *args, **kwargs)
        finally:
            self._layer.logit_soft_cap = cap
        outputs = s if cap is None else tf.tanh(s / cap) * tf.cast(cap, s.dtype)
        return outputs, UseRecord(inputs=inputs, outputs=s, extras=input_mask(inputs), reverse=True)

    # --- the Kronecker parts ------------------------------------------------------
    def _vocab_shape(self) -> tuple[int, ...]:
        return (self.vocabulary,) * (2 if self.full_vocabulary else 1)

    def kron_parts(self) -> list[KronPart] | None:
        if self.tied:
            return None
        return [
            KronPart("embedding", self._vocab_shape(), self.width),
            KronPart("reverse", self._vocab_shape(), self.width),
        ]

    def kron_dims(self) -> tuple[tuple[int, ...], int]:
        return self._vocab_shape(), self.width

    def kron_statistics(
        self,
        records: Sequence[Record],
        output_grads: Sequence[tf.Tensor],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None = None,
    ) -> list[tf.Tensor]:
        """[U, W] over both uses when tied; [U, W] of the embedding, then of the reverse use."""
        uses = list(zip(records, output_grads))
        embedding = [(r, g) for r, g in uses if not getattr(r, "reverse", False)]
        reverse = [(r, g) for r, g in uses if getattr(r, "reverse", False)]
        if self.tied:
            return self._pair(embedding, reverse, batch_size, example_weights)
        return [
            *self._pair(embedding, [], batch_size, example_weights),
            *self._pair([], reverse, batch_size, example_weights),
        ]

    def _pair(
        self,
        embedding: Sequence[tuple[Record, tf.Tensor]],
        reverse: Sequence[tuple[Record, tf.Tensor]],
        batch_size: tf.Tensor | int,
        example_weights: tf.Tensor | None,
    ) -> list[tf.Tensor]:
        dtype = curvature_dtype()
        vocab = tf.zeros([self.vocabulary], dtype)  # the diagonal part: counts (and diag Σ g gᵀ)
        vocab_full = None  # Σ_rev g gᵀ, when the vocabulary side is full
        hidden = tf.zeros([self.width, self.width], dtype)
        positions = tf.constant(0, tf.int32)
        if embedding:
            records = [r for r, _ in embedding]
            ids = tf.concat([tf.reshape(tf.cast(r.inputs, tf.int32), [-1]) for r in records], 0)
            weights = row_weights(records, example_weights, lambda r: tf.reshape(r.inputs, [-1]))
            if weights is None:
                weights = tf.ones_like(ids, dtype)
            vocab += tf.math.unsorted_segment_sum(weights, ids, self.vocabulary)
            g = tf.concat([rows(tf.cast(grads, dtype)) for _, grads in embedding], axis=0)
            hidden += tf.matmul(g, g, transpose_a=True)
            positions += tf.shape(ids)[0]
        if reverse:
            records = [r for r, _ in reverse]
            h = tf.concat([rows(tf.cast(r.inputs, dtype)) for r in records], axis=0)
            weights = row_weights(records, example_weights, lambda r: rows(r.inputs))
            weighted = h if weights is None else h * weights[:, tf.newaxis]
            hidden += tf.matmul(h, weighted, transpose_a=True)
            g = tf.concat([rows(tf.cast(grads, dtype)) for _, grads in reverse], axis=0)
            if self.full_vocabulary:
                vocab_full = tf.matmul(g, g, transpose_a=True)
            else:
                vocab += tf.reduce_sum(tf.square(g), axis=0)
            positions += tf.shape(h)[0]
        b = tf.cast(batch_size, dtype)
        if self.full_vocabulary:
            vocab_side = tf.linalg.diag(vocab)
            if vocab_full is not None:
                vocab_side += vocab_full
        else:
            vocab_side = vocab
        # A layer not called in this pass has no rows: zero factors, not 0/0.
        count = tf.cast(tf.maximum(positions, 1), dtype)
        return [vocab_side / b, hidden / count]

    # --- the variables as (V, H) matrices -------------------------------------------
    def gradient_matrix(self, grads: Sequence[tf.Tensor]) -> tf.Tensor:
        return tf.convert_to_tensor(grads[0])

    def split_matrix(self, matrix: tf.Tensor) -> list[tf.Tensor]:
        return [matrix]

    def gradient_matrices(self, grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return [tf.convert_to_tensor(grads[0]), tf.transpose(grads[1])]

    def split_matrices(self, matrices: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        return [matrices[0], tf.transpose(matrices[1])]
