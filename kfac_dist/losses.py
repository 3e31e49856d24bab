"""Predictive distributions of the supported losses: what the Fisher is taken of.

For each model output with a loss, K-FAC back-propagates output-space vectors
u through the network (a pseudo-loss Σ⟨u, η⟩, η the output's natural
parameters: logits, or the prediction itself for MSE). The vectors are
scaled so that E[u uᵀ] = b·∇²_η L: the GGN of exactly the compiled loss L,
constant factors included (Keras' MSE and BCE average over the last axis,
`sum_over_batch_size` divides by every loss element, loss weights and sample
weights multiply). Modes: "sampled" draws u from the model's own predictive
distribution, "empirical" uses the true labels' gradient, "exact" returns the
columns of a square root of the Hessian (one backward pass per column).
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from kfac_dist.linalg import curvature_dtype

MSE = "mean_squared_error"
CATEGORICAL = "categorical_crossentropy"
SPARSE_CATEGORICAL = "sparse_categorical_crossentropy"
BINARY = "binary_crossentropy"
SUPPORTED_LOSSES = (SPARSE_CATEGORICAL, CATEGORICAL, BINARY, MSE)

SAMPLED = "sampled"
EMPIRICAL = "empirical"
EXACT = "exact"
ESTIMATION_MODES = (SAMPLED, EMPIRICAL, EXACT)

_FUNCTIONS = {
    keras.losses.mean_squared_error: MSE,
    keras.losses.categorical_crossentropy: CATEGORICAL,
    keras.losses.sparse_categorical_crossentropy: SPARSE_CATEGORICAL,
    keras.losses.binary_crossentropy: BINARY,
}
_EPSILON = 1e-7  # keras.config.epsilon(), as Keras clips probabilities


class UnsupportedLossError(ValueError):
    """A loss K-FAC has no predictive distribution for."""


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """One model output's loss, as K-FAC sees it."""

    kind: str
    from_logits: bool
    weight: float
    label_smoothing: float = 0.0

    # --- the natural parameters the Fisher is taken in ---------------------
    def natural_params(self, y_pred: tf.Tensor) -> tf.Tensor:
        """η: logits (recovered from probabilities when needed) or the prediction."""
        y_pred = tf.cast(y_pred, curvature_dtype())
        if self.kind == MSE or self.from_logits:
            return y_pred
        if self.kind == BINARY:
            p = tf.clip_by_value(y_pred, _EPSILON, 1 - _EPSILON)
            return tf.math.log(p) - tf.math.log1p(-p)
        p = y_pred / tf.reduce_sum(y_pred, axis=-1, keepdims=True)
        return tf.math.log(tf.clip_by_value(p, _EPSILON, 1 - _EPSILON))

    def _mean(self, eta: tf.Tensor) -> tf.Tensor:
        if self.kind == MSE:
            return eta
        if self.kind == BINARY:
            return tf.sigmoid(eta)
        return tf.nn.softmax(eta)

    # --- output-space vectors ---------------------------------------------
    def element_scale(self, eta: tf.Tensor, sample_weight) -> tf.Tensor:
        """c = weight·w/T per loss element: b·∂²L/∂ℓ-element (shape η minus last axis)."""
        # Positions per example from the run-time shape: a sequence length
        # unknown when the step is traced (None) must still divide.
        per_example = tf.cast(tf.reduce_prod(tf.shape(eta)[1:-1]), eta.dtype)
        scale = tf.fill(tf.shape(eta)[:-1], self.weight / per_example)
        if sample_weight is None:
            return scale
        w = tf.cast(sample_weight, eta.dtype)
        while w.shape.rank > scale.shape.rank:
            w = tf.squeeze(w, -1)
        while w.shape.rank < scale.shape.rank:
            w = w[..., tf.newaxis]
        return scale * w

    def vectors(self, eta, y_true, sample_weight, mode: str, seed) -> list[tf.Tensor]:
        """The u columns for this output, each shaped like η (gradient-free)."""
        eta = tf.stop_gradient(eta)
        root = tf.sqrt(self.element_scale(eta, sample_weight))[..., tf.newaxis]
        width = eta.shape[-1]
        mean = self._mean(eta)
        if mode == EXACT:
            columns = [self._hessian_root_column(mean, k, width) for k in range(width)]
        elif mode == EMPIRICAL:
            columns = [self._label_gradient(mean, y_true, width)]
        else:
            columns = [self._sampled_gradient(eta, mean, width, seed)]
        return [tf.stop_gradient(root * c) for c in columns]

    def hessian_product(self, eta, a, b, sample_weight) -> tf.Tensor:
        """Σ over loss elements of c·aᵀ H b: b × (a ∇²_η L b) for tangents a, b of η."""
        mean = self._mean(eta)
        width = eta.shape[-1]
        if self.kind == MSE:
            per_element = 2.0 / width * tf.reduce_sum(a * b, -1)
        elif self.kind == BINARY:
            per_element = tf.reduce_sum(mean * (1 - mean) * a * b, -1) / width
        else:
            pa = tf.reduce_sum(mean * a, -1)
            pb = tf.reduce_sum(mean * b, -1)
            per_element = tf.reduce_sum(mean * a * b, -1) - pa * pb
        return tf.reduce_sum(self.element_scale(eta, sample_weight) * per_element)

    def _hessian_root_column(self, mean, k: int, width: int) -> tf.Tensor:
        unit = tf.one_hot(k, width, dtype=mean.dtype)
        if self.kind == MSE:
            return tf.broadcast_to(unit, tf.shape(mean)) * (2.0 / width) ** 0.5
        if self.kind == BINARY:
            p = mean[..., k : k + 1]
            return unit * tf.sqrt(p * (1 - p) / width)
        # Σ_k p_k (e_k − p)(e_k − p)ᵀ = diag(p) − ppᵀ, the softmax Hessian.
        return tf.sqrt(mean[..., k : k + 1]) * (unit - mean)

    def _sampled_gradient(self, eta, mean, width: int, seed) -> tf.Tensor:
        if self.kind == MSE:
            noise = tf.random.stateless_normal(tf.shape(eta), seed, dtype=eta.dtype)
            return noise * (2.0 / width) ** 0.5
        if self.kind == BINARY:
            draw = tf.cast(
                tf.random.stateless_uniform(tf.shape(mean), seed, dtype=mean.dtype) < mean,
                mean.dtype,
            )
            return (mean - draw) / width**0.5
        logits = tf.reshape(eta, [-1, width])
        draw = tf.random.stateless_categorical(logits, 1, seed)[:, 0]
        onehot = tf.reshape(tf.one_hot(draw, width, dtype=mean.dtype), tf.shape(mean))
        return mean - onehot

    def _label_gradient(self, mean, y_true, width: int) -> tf.Tensor:
        if self.kind == SPARSE_CATEGORICAL:
            labels = tf.cast(y_true, tf.int32)
            if labels.shape.rank == mean.shape.rank:
                labels = tf.squeeze(labels, -1)
            target = tf.one_hot(labels, width, dtype=mean.dtype)
        else:
            target = tf.reshape(tf.cast(y_true, curvature_dtype()), tf.shape(mean))
        if self.kind == MSE:
            return 2.0 / width * (mean - target)
        if self.label_smoothing:
            spread = 0.5 if self.kind == BINARY else 1.0 / width
            target = target * (1 - self.label_smoothing) + self.label_smoothing * spread
        if self.kind == BINARY:
            return (mean - target) / width
        return mean - target


def output_loss(loss, weight: float | None = 1.0) -> OutputLoss:
    """Resolves a string, a `keras.losses` object or function to an `OutputLoss`."""
    resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
    fn = getattr(resolved, "fn", resolved)
    kind = _FUNCTIONS.get(fn)
    if kind is None:
        name = (
            loss
            if isinstance(loss, str)
            else getattr(loss, "name", None) or getattr(loss, "__name__", None) or repr(loss)
        )
        raise UnsupportedLossError(
            f"K-FAC cannot register the loss {name!r}: it supports "
            f"{', '.join(SUPPORTED_LOSSES)} (strings or keras.losses objects). "
            "For another loss, register the model's outputs by hand with "
            "kfac_dist.LayerCollection.register_loss(output_name, <one of those>) "
            "and pass layer_collection= to Kfac."
        )
    kwargs = getattr(resolved, "_fn_kwargs", {})
    reduction = getattr(resolved, "reduction", "sum_over_batch_size")
    if reduction not in ("sum_over_batch_size", None):
        raise UnsupportedLossError(
            f"Loss {getattr(resolved, 'name', kind)!r} uses reduction={reduction!r}; "
            "K-FAC supports the default 'sum_over_batch_size'."
        )
    if kwargs.get("axis", -1) != -1:
        raise UnsupportedLossError(f"Loss {kind} with axis={kwargs['axis']}: K-FAC needs axis=-1.")
    return OutputLoss(
        kind=kind,
        from_logits=bool(kwargs.get("from_logits", False)),
        weight=1.0 if weight is None else float(weight),
        label_smoothing=float(kwargs.get("label_smoothing", 0.0) or 0.0),
    )
