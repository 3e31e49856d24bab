"""BatchNormalization and LayerNormalization: a block over (γ, β).

The layer computes s = γ·x̂ + β, so example i's gradients are
dγ_i = Σ_t g_t ∂s_t/∂γ and dβ_i = Σ_t g_t (t over every axis γ is shared on).
∂s/∂γ is taken from the layer's own forward pass, as a forward-mode
derivative along γ: it is x̂ exactly as the layer normalised it — batch or
moving moments, masked moments, moments synchronized across replicas
(`synchronized=True`), RMS scaling — and r·x̂ + d under batch
renormalization (`renorm=True`), whose correction (r, d) rescales γ. Each
output depends on one entry of γ, so a tangent of ones gives it for every
entry in one pass. Diagonal by default, "full" for small layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from kfac_dist.blocks.base import DIAGONAL, FULL, Block
from kfac_dist.blocks.records import Record
from kfac_dist.linalg import curvature_dtype


class ScaleShiftBlock(Block):
    """Curvature of the scale and shift of a normalisation layer."""

    approximations = (DIAGONAL, FULL)

    def __init__(self, layer: Any, approx: str | None = None):
        self._layer = layer
        variables = [
            v
            for v in (getattr(layer, "gamma", None), getattr(layer, "beta", None))
            if v is not None
        ]
        super().__init__(layer.name, variables, approx)
        axis = layer.axis
        self._param_axes = [axis] if isinstance(axis, int) else list(axis)

    @property
    def layer(self) -> Any:
        return self._layer

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        gamma = getattr(self._layer, "gamma", None)
        if gamma is None:
            outputs = call(inputs, *args, **kwargs)
            return outputs, Record(inputs=inputs, outputs=outputs)
        primal = gamma.value
        with tf.autodiff.ForwardAccumulator([primal], [tf.ones_like(primal)]) as accumulator:
            outputs = call(inputs, *args, **kwargs)
        scale_grad = tf.cast(accumulator.jvp(outputs), curvature_dtype())
        return outputs, Record(inputs=inputs, outputs=outputs, extras={"normalized": scale_grad})

    def per_example_gradients(
        self, records: Sequence[Record], output_grads: Sequence[tf.Tensor]
    ) -> tf.Tensor:
        total: tf.Tensor | None = None
        for record, grads in zip(records, output_grads):
            g = tf.cast(grads, curvature_dtype())  # (C, b, ...)
            rank = g.shape.rank - 1
            param_axes = sorted(a % rank for a in self._param_axes)
            shared_axes = [a + 1 for a in range(1, rank) if a not in param_axes]
            parts = []
            if getattr(self._layer, "gamma", None) is not None:
                parts.append(tf.reduce_sum(g * record.extras["normalized"], shared_axes))
            if getattr(self._layer, "beta", None) is not None:
                parts.append(tf.reduce_sum(g, shared_axes))
            flat = [tf.reshape(p, [-1, int(np.prod(p.shape[2:]))]) for p in parts]
            per_record = tf.concat(flat, axis=1)
            total = per_record if total is None else total + per_record
        return total
