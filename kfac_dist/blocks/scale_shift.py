"""BatchNormalization and LayerNormalization: a block over (γ, β).

The layer computes s = γ·x̂ + β, so example i's gradients are
dγ_i = Σ_t g_t x̂_t and dβ_i = Σ_t g_t (t over every axis γ is shared on).
x̂ is recomputed from the layer's input as the layer normalises it (batch
moments in training, moving moments otherwise; per replica, as Keras does
unless `synchronized=True`). Diagonal by default, "full" for small layers.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from kfac_dist.blocks.base import DIAGONAL, FULL, Block, Record
from kfac_dist.linalg import curvature_dtype


class ScaleShiftBlock(Block):
    """Curvature of the scale and shift of a normalisation layer."""

    approximations = (DIAGONAL, FULL)

    def __init__(self, layer, approx: str | None = None):
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
    def layer(self):
        return self._layer

    def record(self, call, inputs, *args, **kwargs):
        outputs = call(inputs, *args, **kwargs)
        training = kwargs.get("training", args[0] if args else None)
        normalized = self._normalize(tf.cast(inputs, curvature_dtype()), training)
        return outputs, Record(inputs=inputs, outputs=outputs, extras={"normalized": normalized})

    def _normalize(self, x: tf.Tensor, training) -> tf.Tensor:
        layer = self._layer
        rank = x.shape.rank
        param_axes = [a % rank for a in self._param_axes]
        if isinstance(layer, keras.layers.BatchNormalization):
            reduce_axes = [a for a in range(rank) if a not in param_axes]
            if training:
                mean, variance = tf.nn.moments(x, reduce_axes, keepdims=True)
            else:
                shape = [x.shape[a] if a in param_axes else 1 for a in range(rank)]
                mean = tf.reshape(tf.cast(layer.moving_mean, curvature_dtype()), shape)
                variance = tf.reshape(tf.cast(layer.moving_variance, curvature_dtype()), shape)
            return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)
        if getattr(layer, "rms_scaling", False):
            # Keras 3's (deprecated) rms_scaling divides x — not centred — by
            # the standard deviation, not by the root mean square.
            _, variance = tf.nn.moments(x, param_axes, keepdims=True)
            return x * tf.math.rsqrt(variance + layer.epsilon)
        mean, variance = tf.nn.moments(x, param_axes, keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + layer.epsilon)

    def per_example_gradients(self, records, output_grads):
        total = None
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
