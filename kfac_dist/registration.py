"""Walking a Keras model into curvature blocks, and manual registration.

Registration knows Keras layers; blocks know math. Nested models and
layers are walked, frozen layers skipped, and every trainable variable ends
up in exactly one block, that of the innermost layer owning it: a layer
K-FAC does not know is an error that says how to register it, unless the
user opts into a diagonal block for it.
"""

from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import keras

from kfac_dist import losses as losses_lib
from kfac_dist.blocks import (
    Block,
    ConvBlock,
    ConvTransposeBlock,
    DenseBlock,
    DepthwiseConvBlock,
    EinsumDenseBlock,
    EmbeddingBlock,
    GenericDiagonalBlock,
    PositionEmbeddingBlock,
    ReversibleEmbeddingBlock,
    ScaleShiftBlock,
    SeparableConvBlock,
    conv_block,
    einsum_dense,
    recurrent,
)
from kfac_dist.options import (
    EXPAND,
    UNSUPPORTED_LAYER_POLICIES,  # noqa: F401  (what to do without a block)
)

#: How a block is made for a layer: from the layer and its approximation (None: the
#: default). A factory returns None for a layer of its class that it cannot cover.
BlockFactory = Callable[[Any, "str | None"], "Block | None"]

BLOCK_OF_LAYER: dict[type, BlockFactory] = {
    keras.layers.Dense: DenseBlock,
    # groups > 1: one Kronecker pair per group (GroupedConvBlock).
    keras.layers.Conv1D: conv_block,
    keras.layers.Conv2D: conv_block,
    keras.layers.Conv3D: ConvBlock,
    keras.layers.Conv1DTranspose: ConvTransposeBlock,
    keras.layers.Conv2DTranspose: ConvTransposeBlock,
    keras.layers.Conv3DTranspose: ConvTransposeBlock,
    keras.layers.DepthwiseConv1D: DepthwiseConvBlock,
    keras.layers.DepthwiseConv2D: DepthwiseConvBlock,
    keras.layers.SeparableConv1D: SeparableConvBlock,
    keras.layers.SeparableConv2D: SeparableConvBlock,
    keras.layers.EinsumDense: einsum_dense.einsum_dense_block,
    keras.layers.Embedding: EmbeddingBlock,
    # Also keras-hub's (a subclass with Keras' `call`): both uses of the table.
    keras.layers.ReversibleEmbedding: ReversibleEmbeddingBlock,
    keras.layers.BatchNormalization: ScaleShiftBlock,
    keras.layers.LayerNormalization: ScaleShiftBlock,
    keras.layers.SimpleRNN: recurrent.recurrent_block,
    keras.layers.LSTM: recurrent.recurrent_block,
    keras.layers.GRU: recurrent.recurrent_block,
    keras.layers.GroupNormalization: ScaleShiftBlock,
    keras.layers.RMSNormalization: ScaleShiftBlock,
}
SUPPORTED_LAYER_NAMES = ", ".join(cls.__name__ for cls in BLOCK_OF_LAYER)
#: Layers of optional packages, (module, attribute path, factory): added to
#: BLOCK_OF_LAYER once the module is imported. Importing keras-hub takes
#: seconds, and a model holding its layers has imported it already.
OPTIONAL_LAYERS: tuple[tuple[str, str, BlockFactory], ...] = (
    ("keras_hub", "layers.PositionEmbedding", PositionEmbeddingBlock),
)
#: Why a layer of a supported class is still not covered (its factory returned None).
WHY_UNSUPPORTED: dict[type, Callable[[Any], str | None]] = {
    keras.layers.EinsumDense: einsum_dense.why_unsupported,
    keras.layers.SimpleRNN: recurrent.why_unsupported,
    keras.layers.LSTM: recurrent.why_unsupported,
    keras.layers.GRU: recurrent.why_unsupported,
    # The cell owns the variables, so it is the layer an error names.
    keras.layers.SimpleRNNCell: recurrent.why_cell_unsupported,
    keras.layers.LSTMCell: recurrent.why_cell_unsupported,
    keras.layers.GRUCell: recurrent.why_cell_unsupported,
}
#: The blocks that take `kron_sharing` (how positions enter their Kronecker factors).
KRON_SHARING_BLOCKS = (DenseBlock, EinsumDenseBlock)


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
    Each variable belongs to one block: registering it twice is an error.
    """

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self.losses: dict[str | int, tuple[object, float]] = {}

    def register_layer(self, layer: keras.layers.Layer, fisher_approx: str | None = None) -> Block:
        """Registers a supported layer (any class in `BLOCK_OF_LAYER`)."""
        block = _block_for(layer, fisher_approx)
        if block is None:
            raise UnsupportedLayerError(_unsupported_message([(layer, None)]))
        return self._add(block)

    def register_generic(self, variables: Sequence, name: str) -> Block:
        """Registers arbitrary variables with a diagonal block."""
        variables = list(variables)
        if not variables:
            raise ValueError(
                f"register_generic(name={name!r}) got no variables: pass the variables "
                "to precondition (e.g. layer.trainable_variables of a built layer)."
            )
        return self._add(GenericDiagonalBlock(name, variables))

    def register_loss(self, output: str | int, loss: Any, weight: float = 1.0) -> None:
        """Registers the loss of one model output (by name or index)."""
        losses_lib.output_loss(loss, weight)  # fail now, not at the first step
        self.losses[output] = (loss, weight)

    def _add(self, block: Block) -> Block:
        registered_by = {_key(v): b.name for b in self.blocks for v in b.variables}
        if block.name in {b.name for b in self.blocks}:
            raise ValueError(
                f"LayerCollection already has a block named {block.name!r}; give each "
                "block its own name."
            )
        twice, seen = [], set()
        for variable in block.variables:
            if _key(variable) in registered_by or _key(variable) in seen:
                twice.append(variable)
            seen.add(_key(variable))
        if twice:
            raise ValueError(
                "Variable(s) registered twice: "
                + ", ".join(
                    f"{v.path} (already in block {registered_by.get(_key(v), block.name)!r})"
                    for v in twice
                )
                + f", now again in {block.name!r}. Each variable belongs to exactly one "
                "block. A layer's variables include its sublayers' (MultiHeadAttention's "
                "query/key/value/output, an LSTM's cell): register the container or its "
                "parts, not both."
            )
        self.blocks.append(block)
        return block


def _block_for(layer: Any, fisher_approx: str | None) -> Block | None:
    """The block of a supported layer whose forward pass is the one the block models.

    A subclass that overrides `call` computes something else from the same
    variables (a scaled output, another projection): its block's
    factors would be wrong, so it is treated as unsupported (None).
    """
    _add_optional_layers()
    for cls, make_block in BLOCK_OF_LAYER.items():
        if isinstance(layer, cls) and getattr(type(layer), "call", None) is getattr(
            cls, "call", None
        ):
            return make_block(layer, fisher_approx)
    return None


def _add_optional_layers() -> None:
    """Registers the OPTIONAL_LAYERS whose package is imported (a look-up in sys.modules)."""
    for module_name, attribute, make_block in OPTIONAL_LAYERS:
        cls: Any = sys.modules.get(module_name)
        for name in attribute.split("."):
            cls = getattr(cls, name, None)
        if isinstance(cls, type):
            BLOCK_OF_LAYER.setdefault(cls, make_block)


def _describe(layer: Any, parent: Any) -> str:
    where = f", in '{parent.name}'" if parent is not None else ""
    why = next((why(layer) for cls, why in WHY_UNSUPPORTED.items() if isinstance(layer, cls)), None)
    because = f": {why}" if why else ""
    return f"'{layer.name}' ({type(layer).__name__}{where}{because})"


def _unsupported_message(layers: Sequence[tuple[Any, Any]]) -> str:
    names = ", ".join(_describe(layer, parent) for layer, parent in layers)
    return (
        f"K-FAC cannot register the trainable layer(s) {names}. Supported layers: "
        f"{SUPPORTED_LAYER_NAMES}. To train them anyway, either pass "
        "unsupported_layers='diagonal' to Kfac (a diagonal Fisher block for each), "
        "or register them by hand: lc = kfac_dist.LayerCollection(); "
        "lc.register_generic(layer.trainable_variables, name=layer.name); "
        "Kfac(..., layer_collection=lc). If another optimizer trains them (a "
        "keras.optimizers.MultiOptimizer), pass unsupported_layers='diagonal': K-FAC "
        "drops their blocks when the MultiOptimizer gives it its share."
    )


def _registered_twice_message(
    taken: Sequence[Any], registered_by: Mapping[int, str], layer: Any
) -> str:
    names = ", ".join(f"{v.path} (block {registered_by[_key(v)]!r})" for v in taken)
    return (
        f"Variable(s) {names} are registered in the LayerCollection, and K-FAC would "
        f"register them again in the block of layer '{layer.name}' "
        f"({type(layer).__name__}) with the layer's other variables. Each variable "
        "belongs to exactly one block: register the whole layer with "
        "lc.register_layer(layer), or all of its variables by hand."
    )


def _check_not_split(blocks: Sequence[Block], trainable: set[int]) -> None:
    """A block's variables are all K-FAC's or none: its curvature couples them."""
    for block in blocks:
        given = [_key(v) in trainable for v in block.variables]
        if any(given) and not all(given):
            mine = ", ".join(v.path for v, g in zip(block.variables, given) if g)
            others = ", ".join(v.path for v, g in zip(block.variables, given) if not g)
            raise ValueError(
                f"Block {block.name!r} would be split: K-FAC is given {mine} but not "
                f"{others}. Its Fisher block couples all of them: give all of a layer's "
                "variables to Kfac or none (in a MultiOptimizer, map the layer's path, "
                "e.g. 'dense_1/.*', to one optimizer)."
            )


def _approx_for(layer: Any, fisher_approx: Mapping | str | None) -> str | None:
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


def _walk(model: keras.Model) -> Iterator[tuple[keras.layers.Layer, object, int]]:
    """(layer, parent, depth) for every layer under `model`, parents first, each once.

    The parent of a layer directly in `model` is None.
    """
    seen = {id(model)}
    stack = [(model, None, 0)]
    while stack:
        layer, parent, depth = stack.pop(0)
        yield layer, parent, depth
        for child in layer._flatten_layers(include_self=False, recursive=False):  # noqa: SLF001
            if id(child) not in seen:
                seen.add(id(child))
                stack.append((child, layer if layer is not model else None, depth + 1))


def _innermost_owners(
    walk: Sequence[tuple[keras.layers.Layer, object, int]],
) -> dict[int, tuple[keras.layers.Layer, object]]:
    """Each variable's innermost owner: the deepest layer that holds it directly."""
    owners: dict[int, tuple[keras.layers.Layer, object, int]] = {}
    for layer, parent, depth in walk:
        for variable in layer._trainable_variables:  # noqa: SLF001
            key = _key(variable)
            if key not in owners or depth > owners[key][2]:
                owners[key] = (layer, parent, depth)
    return {key: (layer, parent) for key, (layer, parent, _) in owners.items()}


def is_built(model: keras.Model) -> bool:
    """Whether every layer of `model` has created its variables (as Keras checks it).

    `model.built` alone is not enough: a subclassed model after
    `model.build(shape)`, or a `Sequential` without an `Input`, is marked
    built before its layers have been called.
    """
    return all(layer.built for layer in model._flatten_layers())  # noqa: SLF001


def build_from_batch(model: keras.Model, x: Any) -> None:
    """Creates the variables of a model that builds late, from a batch's shapes.

    Keras itself defers this to the first traced forward pass when no
    strategy is set; K-FAC needs the variables before that pass, to record
    the layers in it. The build is symbolic (Keras' own, as under a
    strategy): it adds nothing to the traced step.
    """
    if is_built(model):
        return
    spec = keras.tree.map_structure(
        lambda t: None if t is None else keras.KerasTensor(t.shape, t.dtype.name), x
    )
    keras.src.backend.compute_output_spec(model, spec, training=False)


def _key(variable: Any) -> int:
    return id(getattr(variable, "value", variable))


def _with_unique_names(blocks: list[Block]) -> list[Block]:
    """Renames automatic blocks that share a layer name after their variables' path.

    Layer names repeat inside containers (every MultiHeadAttention has a
    'query'); placement needs one name per block.
    """
    counts = Counter(block.name for block in blocks)
    taken = {block.name for block in blocks if counts[block.name] == 1}
    for block in blocks:
        if counts[block.name] == 1:
            continue
        path = block.variables[0].path.rsplit("/", 1)[0].replace("/", ".")
        name, suffix = path, 1
        while name in taken:
            suffix += 1
            name = f"{path}_{suffix}"
        block.name = name
        taken.add(name)
    return blocks


def collect_blocks(
    model: keras.Model,
    *,
    fisher_approx: Mapping | None = None,
    kron_sharing: str = EXPAND,
    unsupported_layers: str = "error",
    layer_collection: LayerCollection | None = None,
    variables: Sequence | None = None,
    max_factor_dim: int | None = None,
) -> list[Block]:
    """Blocks covering every trainable variable of `model` exactly once.

    Manual registrations come first; then each supported layer gets its block;
    every variable left is preconditioned by the innermost layer that owns it
    (a diagonal block on request), so a container whose variables all sit in
    supported sublayers needs nothing of its own.

    `variables` (default: all of the model's trainable variables) are the
    ones K-FAC trains, e.g. its share in a `MultiOptimizer`: only they are
    registered, and a block cannot be split between K-FAC and another
    optimizer.

    `max_factor_dim` bounds every block's factors (`Block.max_factor_dim`):
    a larger matrix factor is kept as its diagonal blocks.
    """
    variables = list(model.trainable_variables if variables is None else variables)
    blocks = list(layer_collection.blocks) if layer_collection else []
    trainable = {_key(v) for v in variables}
    _check_not_split(blocks, trainable)
    blocks = [b for b in blocks if any(_key(v) in trainable for v in b.variables)]
    registered_by = {_key(v): block.name for block in blocks for v in block.variables}
    walk = list(_walk(model))
    for layer, _, _ in walk:
        block = _block_for(layer, _approx_for(layer, fisher_approx)) if layer.trainable else None
        if block is None or not any(_key(v) in trainable for v in block.variables):
            continue
        _check_not_split([block], trainable)
        keys = {_key(v) for v in block.variables}
        if keys != {_key(v) for v in layer.trainable_variables if _key(v) in trainable}:
            continue  # variables beyond the block's: left to their owners below
        taken = [v for v in block.variables if _key(v) in registered_by]
        if len(taken) == len(keys):
            continue  # the whole layer is registered by hand
        if taken:
            raise ValueError(_registered_twice_message(taken, registered_by, layer))
        blocks.append(block)
        registered_by.update((key, block.name) for key in keys)
    owners = _innermost_owners(walk)
    left: dict[int, list] = {}
    for variable in variables:
        key = _key(variable)
        if key not in registered_by and key in owners:
            left.setdefault(id(owners[key][0]), []).append(variable)
    unsupported = [(layer, parent) for layer, parent, _ in walk if id(layer) in left]
    if unsupported:
        if unsupported_layers != "diagonal":
            raise UnsupportedLayerError(_unsupported_message(unsupported))
        warnings.warn(
            "K-FAC preconditions these layers with a diagonal block: "
            + ", ".join(_describe(layer, parent) for layer, parent in unsupported),
            stacklevel=3,
        )
        for layer, _ in unsupported:
            own = left[id(layer)]
            blocks.append(GenericDiagonalBlock(layer.name, own))
            registered_by.update((_key(v), layer.name) for v in own)
    missing = [v for v in variables if _key(v) not in registered_by]
    if missing:
        raise UnsupportedLayerError(
            "These trainable variables belong to no layer K-FAC can see: "
            + ", ".join(v.path for v in missing)
            + ". Register them with LayerCollection.register_generic(variables, name=...)."
        )
    for block in blocks:
        # Exactly these kinds: a convolution's patches are not positions of one row.
        if type(block) in KRON_SHARING_BLOCKS and isinstance(block, DenseBlock):
            block.kron_sharing = kron_sharing
        block.max_factor_dim = max_factor_dim
    return _with_unique_names(blocks)
