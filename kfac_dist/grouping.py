"""Equally shaped tensors handled as one stack: per-factor work as one op per shape.

A model's factors come in few shapes (every Dense(16) block has a 17×17 A
and a 16×16 G). Stacking each shape's factors turns the graph of every
per-factor phase (fold, sync, inversion, sharing, install) into a handful of
batched ops, so that tracing and compiling a step grows with the number of
shapes, not of factors; only the variable reads and writes stay per factor.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import tensorflow as tf


def groups_of(keys: Sequence[Hashable]) -> list[list[int]]:
    """Positions with equal keys (shapes, payload signatures), groups in first-seen order."""
    groups: dict[Hashable, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    return list(groups.values())


def chunks_by_bytes(sizes: Sequence[int], limit: int | None) -> list[list[int]]:
    """Positions in order, cut into runs whose `sizes` sum to at most `limit` (None: one run).

    An item larger than `limit` makes a run of its own.
    """
    chunks: list[list[int]] = [[]]
    total = 0
    for position, size in enumerate(sizes):
        if chunks[-1] and limit is not None and total + size > limit:
            chunks.append([])
            total = 0
        chunks[-1].append(position)
        total += size
    return chunks


def shape_groups(tensors: Sequence) -> list[list[int]]:
    """Positions of tensors (or variables) of equal shape and dtype."""
    return groups_of([(tuple(t.shape), tf.as_dtype(t.dtype)) for t in tensors])


def stacks(tensors: Sequence, groups: Sequence[Sequence[int]]) -> list[tf.Tensor]:
    """One (k, *shape) stack per group (variables are read)."""
    return [tf.stack([tf.convert_to_tensor(tensors[p]) for p in group]) for group in groups]


def unstacked(
    group_stacks: Sequence[tf.Tensor], groups: Sequence[Sequence[int]], count: int
) -> list[tf.Tensor]:
    """The inverse of `stacks`: one tensor per position, `count` positions in all."""
    out: list[tf.Tensor | None] = [None] * count
    for stack, group in zip(group_stacks, groups):
        for position, tensor in zip(group, tf.unstack(stack, num=len(group))):
            out[position] = tensor
    return out
