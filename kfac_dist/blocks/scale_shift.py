"""Normalisation layers (Batch, Layer, Group, RMS): a block over their scale and shift (γ, β).

The layer computes s = γ·x̂ + β, so example i's gradients are
dγ_i = Σ_t g_t ∂s_t/∂γ and dβ_i = Σ_t g_t (t over every axis γ is shared on).
∂s/∂γ is taken from the layer's own forward pass, as a forward-mode
derivative along γ: it is x̂ exactly as the layer normalised it — batch or
moving moments, masked moments, moments synchronized across replicas
(`synchronized=True`), RMS scaling — and r·x̂ + d under batch
renormalization (`renorm=True`), whose correction (r, d) rescales γ. Each
output depends on one entry of γ, so a tangent of ones gives it for every
entry in one pass. Diagonal by default, "full" for small layers.

GroupNormalization's x̂ is normalised per example and group of channels, and
RMSNormalization's is x/rms(x) with a scale γ (its weight `scale`) and no
shift: both come out of the same forward-mode derivative.
UnitNormalization has no weights, so it needs no block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kfac_dist.blocks.base import DIAGONAL, FULL, Block
from kfac_dist.blocks.records import Record
from kfac_dist.linalg import curvature_dtype


def scale_and_shift(layer: Any) -> tuple[Any, Any]:
    """The layer's (scale, shift) variables, None where it has none.

    γ and β are `gamma` and `beta` (Batch, Layer, GroupNormalization);
    RMSNormalization's γ is `scale`, an attribute that the others use for
    the flag that turns γ on, hence the check that it is a variable.
    """
    scale = getattr(layer, "gamma", None)
    if scale is None and isinstance(getattr(layer, "scale", None), keras.Variable):
        scale = layer.scale
    return scale, getattr(layer, "beta", None)


class ScaleShiftBlock(Block):
    """Curvature of the scale and shift of a normalisation layer."""

    approximations = (DIAGONAL, FULL)

    def __init__(self, layer: Any, approx: str | None = None):
        self._layer = layer
        self._scale, self._shift = scale_and_shift(layer)
        variables = [v for v in (self._scale, self._shift) if v is not None]
        super().__init__(layer.name, variables, approx)
        axis = layer.axis
        self._param_axes = [axis] if isinstance(axis, int) else list(axis)

    @property
    def layer(self) -> Any:
        return self._layer

    def record(
        self, call: Callable[..., Any], inputs: Any, *args: Any, **kwargs: Any
    ) -> tuple[Any, Record]:
        gamma = self._scale
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
            if self._scale is not None:
                parts.append(tf.reduce_sum(g * record.extras["normalized"], shared_axes))
            if self._shift is not None:
                parts.append(tf.reduce_sum(g, shared_axes))
            flat = [tf.reshape(p, [-1, int(np.prod(p.shape[2:]))]) for p in parts]
            per_record = tf.concat(flat, axis=1)
            total = per_record if total is None else total + per_record
        return total
