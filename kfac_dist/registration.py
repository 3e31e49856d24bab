"""Walking a Keras model into curvature blocks, and manual registration.

Registration knows Keras layers; blocks know math. Nested models are
flattened, frozen layers skipped, and every trainable variable must end up in
exactly one block: a layer K-FAC does not know is an error that says how to
register it, unless the user opts into a diagonal block for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import keras

from kfac_dist import losses as losses_lib
from kfac_dist.blocks import (
    Block,
    ConvBlock,
    DenseBlock,
    EmbeddingBlock,
    GenericDiagonalBlock,
    ScaleShiftBlock,
)

BLOCK_OF_LAYER: dict[type, type[Block]] = {
    keras.layers.Dense: DenseBlock,
    keras.layers.Conv1D: ConvBlock,
    keras.layers.Conv2D: ConvBlock,
    keras.layers.Embedding: EmbeddingBlock,
    keras.layers.BatchNormalization: ScaleShiftBlock,
    keras.layers.LayerNormalization: ScaleShiftBlock,
}
SUPPORTED_LAYER_NAMES = ", ".join(cls.__name__ for cls in BLOCK_OF_LAYER)
UNSUPPORTED_LAYER_POLICIES = ("error", "diagonal")


class UnsupportedLayerError(ValueError):
    """A trainable layer K-FAC cannot register automatically."""


class LayerCollection:
    """Manual registration of layers, variables and losses.

    Example:
        lc = kfac_dist.LayerCollection()
        lc.register_layer(model.get_layer("dense"))          # a supported layer
        lc.register_generic(my_layer.trainable_variables, name="my_layer")
        lc.register_loss("output", "mean_squared_error")
        Kfac(..., layer_collection=lc)

    Layers of the model left out of the collection are registered
    automatically; losses left out come from `Kfac(loss=...)` or `compile`.
    """

    def __init__(self):
        self.blocks: list[Block] = []
        self.losses: dict[str | int, tuple[object, float]] = {}

    def register_layer(self, layer: keras.layers.Layer, fisher_approx: str | None = None) -> Block:
        """Registers a supported layer (Dense, Conv1D/2D, Embedding, BN, LN)."""
        block = _block_for(layer, fisher_approx)
        if block is None:
            raise UnsupportedLayerError(_unsupported_message([layer]))
        self.blocks.append(block)
        return block

    def register_generic(self, variables: Sequence, name: str) -> Block:
        """Registers arbitrary variables with a diagonal block."""
        block = GenericDiagonalBlock(name, variables)
        self.blocks.append(block)
        return block

    def register_loss(self, output: str | int, loss, weight: float = 1.0) -> None:
        """Registers the loss of one model output (by name or index)."""
        losses_lib.output_loss(loss, weight)  # fail now, not at the first step
        self.losses[output] = (loss, weight)


def _block_for(layer, fisher_approx: str | None) -> Block | None:
    for cls, block_cls in BLOCK_OF_LAYER.items():
        if type(layer) is cls or isinstance(layer, cls):
            return block_cls(layer, fisher_approx)
    return None


def _unsupported_message(layers) -> str:
    names = ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in layers)
    return (
        f"K-FAC cannot register the trainable layer(s) {names}. Supported layers: "
        f"{SUPPORTED_LAYER_NAMES}. To train them anyway, either pass "
        "unsupported_layers='diagonal' to Kfac (a diagonal Fisher block for each), "
        "or register them by hand: lc = kfac_dist.LayerCollection(); "
        "lc.register_generic(layer.trainable_variables, name=layer.name); "
        "Kfac(..., layer_collection=lc)."
    )


def _approx_for(layer, fisher_approx: Mapping | str | None) -> str | None:
    if fisher_approx is None or isinstance(fisher_approx, str):
        return fisher_approx if isinstance(fisher_approx, str) and fisher_approx else None
    if layer.name in fisher_approx:
        return fisher_approx[layer.name]
    for key, approx in fisher_approx.items():
        if isinstance(key, type) and isinstance(layer, key):
            return approx
        if isinstance(key, str) and key == type(layer).__name__:
            return approx
    return None


def _leaf_layers(model: keras.Model):
    for layer in model._flatten_layers(include_self=False, recursive=True):  # noqa: SLF001
        if isinstance(layer, keras.Model) or not layer.trainable:
            continue
        yield layer


def _key(variable) -> int:
    return id(getattr(variable, "value", variable))


def collect_blocks(
    model: keras.Model,
    *,
    fisher_approx: Mapping | None = None,
    unsupported_layers: str = "error",
    layer_collection: LayerCollection | None = None,
) -> list[Block]:
    """Blocks covering every trainable variable of `model` exactly once."""
    blocks = list(layer_collection.blocks) if layer_collection else []
    covered = {_key(v) for block in blocks for v in block.variables}
    unsupported = []
    for layer in _leaf_layers(model):
        own = [v for v in layer.trainable_variables if _key(v) not in covered]
        if not own:
            continue
        block = _block_for(layer, _approx_for(layer, fisher_approx))
        if block is None or {_key(v) for v in block.variables} != {_key(v) for v in own}:
            unsupported.append(layer)
            continue
        blocks.append(block)
        covered.update(_key(v) for v in block.variables)
    if unsupported:
        if unsupported_layers != "diagonal":
            raise UnsupportedLayerError(_unsupported_message(unsupported))
        warnings.warn(
            "K-FAC preconditions these layers with a diagonal block: "
            + ", ".join(f"'{layer.name}' ({type(layer).__name__})" for layer in unsupported),
            stacklevel=3,
        )
        for layer in unsupported:
            own = [v for v in layer.trainable_variables if _key(v) not in covered]
            blocks.append(GenericDiagonalBlock(layer.name, own))
            covered.update(_key(v) for v in own)
    missing = [v for v in model.trainable_variables if _key(v) not in covered]
    if missing:
        raise UnsupportedLayerError(
            "These trainable variables belong to no layer K-FAC can see: "
            + ", ".join(v.path for v in missing)
            + ". Register them with LayerCollection.register_generic(variables, name=...)."
        )
    return blocks
