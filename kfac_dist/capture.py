"""Recording each registered layer's inputs and pre-activations in a forward pass.

For the duration of one traced forward pass, each layer-bound block's layer
has its `call` replaced (on the instance only) by one that records what the
block needs and returns the layer's usual output. Every call is recorded, so a
layer used several times contributes all its uses.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kfac_dist.blocks import Block, Record


@contextlib.contextmanager
def recording(blocks: Sequence[Block]) -> Iterator[list[list[Record]]]:
    """Yields one list of `Record`s per block, filled by the forward pass."""
    records: list[list[Record]] = [[] for _ in blocks]
    patched: list[tuple[Any, bool, Callable[..., Any]]] = []
    for block, block_records in zip(blocks, records):
        layer = block.layer
        if layer is None:
            continue
        original = layer.call

        @functools.wraps(original)
        def call(
            *args: Any,
            _block: Block = block,
            _out: list[Record] = block_records,
            _original: Callable[..., Any] = original,
            **kwargs: Any,
        ) -> Any:
            outputs, record = _block.record(_original, *args, **kwargs)
            _out.append(record)
            return outputs

        patched.append((layer, "call" in layer.__dict__, original))
        object.__setattr__(layer, "call", call)
    try:
        yield records
    finally:
        for layer, had_own, original in patched:
            if had_own:
                object.__setattr__(layer, "call", original)
            else:
                object.__delattr__(layer, "call")
