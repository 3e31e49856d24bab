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
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras.src.backend import get_keras_mask
from keras.src.backend.tensorflow.nn import _get_logits
from keras.src.losses.loss import apply_mask

from kfac_dist.linalg import curvature_dtype
from kfac_dist.options import (  # noqa: F401  (the estimation modes, with the losses)
    EMPIRICAL,
    ESTIMATION_MODES,
    EXACT,
    SAMPLED,
)

MSE = "mean_squared_error"
CATEGORICAL = "categorical_crossentropy"
SPARSE_CATEGORICAL = "sparse_categorical_crossentropy"
BINARY = "binary_crossentropy"
SUPPORTED_LOSSES = (SPARSE_CATEGORICAL, CATEGORICAL, BINARY, MSE)


_FUNCTIONS = {
    keras.losses.mean_squared_error: MSE,
    keras.losses.categorical_crossentropy: CATEGORICAL,
    keras.losses.sparse_categorical_crossentropy: SPARSE_CATEGORICAL,
    keras.losses.binary_crossentropy: BINARY,
}
_EPSILON = 1e-7  # keras.config.epsilon(), as Keras clips probabilities
# Keras' reductions, by what K-FAC scales the loss elements with.
MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")
SUM_REDUCTIONS = ("sum", None, "none")
# The op whose input Keras takes as logits for each cross-entropy.
_LOGITS_OP = {CATEGORICAL: "Softmax", SPARSE_CATEGORICAL: "Softmax", BINARY: "Sigmoid"}
# Exact mode takes one backward pass per Hessian-root column.
MAX_EXACT_COLUMNS = 4096


class UnsupportedLossError(ValueError):
    """A loss K-FAC has no predictive distribution for."""


@dataclasses.dataclass(frozen=True)
class OutputLoss:
    """One model output's loss, as K-FAC sees it."""

    kind: str
    from_logits: bool
    weight: float
    label_smoothing: float = 0.0
    reduction: str | None = "sum_over_batch_size"
    # The dtype Keras' loss computes in (a Loss object's own, else floatx).
    dtype: str | None = None

    # --- the natural parameters the Fisher is taken in ---------------------
    def natural_params(self, y_pred: tf.Tensor) -> tf.Tensor:
        """η: the logits Keras' loss uses, or the prediction itself for MSE.

        Keras' cross-entropies take the pre-activation of a softmax or sigmoid
        output (`_keras_logits`, or the input of a Softmax/Sigmoid op) as
        logits whatever the loss: a softmax output under binary cross-entropy
        trains sigmoid cross-entropy on the pre-activation, and so does its
        Fisher here. Otherwise logits are recovered from probabilities. A loss
        computing in another dtype than the output's casts the output first,
        which loses the pre-activation: Keras then uses the probabilities.
        """
        if self.kind == MSE:
            return tf.cast(y_pred, curvature_dtype())
        if self.dtype is not None and y_pred.dtype != self.dtype:
            y_pred = tf.cast(y_pred, self.dtype)
        logits, from_logits = _get_logits(y_pred, self.from_logits, _LOGITS_OP[self.kind], "")
        y_pred = tf.cast(logits, curvature_dtype())
        if from_logits:
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
    def effective_weights(self, y_pred: tf.Tensor, sample_weight: Any) -> tf.Tensor | None:
        """The weights Keras gives each loss element: sample weights times the mask.

        A Keras mask on the prediction (`Embedding(mask_zero=True)`,
        `Masking`, `compute_mask`) zeroes padded elements and, under a mean
        reduction, scales the valid ones by (elements / valid elements), as
        Keras' `apply_mask` does; the result replaces the sample weights.
        """
        mask = get_keras_mask(y_pred)
        if mask is None:
            return sample_weight
        return apply_mask(sample_weight, mask, curvature_dtype(), self.reduction)

    def element_scale(self, eta: tf.Tensor, sample_weight: Any) -> tf.Tensor:
        """c = b·∂L/∂ℓ-element per loss element (shape η minus last axis).

        Mean reductions: weight·w/T (L divides by the b·T elements of the
        local batch). Sum reductions (and `reduction=None`, whose per-element
        losses Keras' gradient sums): weight·w·B, B the global batch, as L is
        then a sum over every example of every replica.
        """
        shape = tf.shape(eta)[:-1]
        if self.reduction in MEAN_REDUCTIONS:
            # Positions per example from the run-time shape: a sequence length
            # unknown when the step is traced (None) must still divide.
            per_example = tf.cast(tf.reduce_prod(shape[1:]), eta.dtype)
            scale = tf.fill(shape, self.weight / per_example)
        else:
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            global_batch = tf.cast(shape[0] * replicas, eta.dtype)
            scale = tf.fill(shape, self.weight * global_batch)
        if sample_weight is None:
            return scale
        w = tf.cast(sample_weight, eta.dtype)
        while w.shape.rank > scale.shape.rank:
            w = tf.squeeze(w, -1)
        while w.shape.rank < scale.shape.rank:
            w = w[..., tf.newaxis]
        return scale * w

    def vectors(
        self, eta: tf.Tensor, y_true: Any, sample_weight: Any, mode: str, seed: tf.Tensor
    ) -> list[tf.Tensor]:
        """The u columns for this output, each shaped like η (gradient-free).

        Exact mode: Σ_columns u uᵀ is the loss Hessian, which is block-diagonal
        over positions (one loss element each): one column per position and
        output coordinate, each zero at every other position, so that no
        cross-position term enters the Fisher.
        """
        eta = tf.stop_gradient(eta)
        root = tf.sqrt(self.element_scale(eta, sample_weight))[..., tf.newaxis]
        width = eta.shape[-1]
        mean = self._mean(eta)
        if mode == EXACT:
            columns = [
                position * self._hessian_root_column(mean, k, width)
                for position in _position_indicators(eta)
                for k in range(width)
            ]
        elif mode == EMPIRICAL:
            columns = [self._label_gradient(mean, y_true, width)]
        else:
            columns = [self._sampled_gradient(eta, mean, width, seed)]
        return [tf.stop_gradient(root * c) for c in columns]

    def hessian_product(
        self, eta: tf.Tensor, a: tf.Tensor, b: tf.Tensor, sample_weight: Any
    ) -> tf.Tensor:
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

    def _hessian_root_column(self, mean: tf.Tensor, k: int, width: int) -> tf.Tensor:
        unit = tf.one_hot(k, width, dtype=mean.dtype)
        if self.kind == MSE:
            return tf.broadcast_to(unit, tf.shape(mean)) * (2.0 / width) ** 0.5
        if self.kind == BINARY:
            p = mean[..., k : k + 1]
            return unit * tf.sqrt(p * (1 - p) / width)
        # Σ_k p_k (e_k − p)(e_k − p)ᵀ = diag(p) − ppᵀ, the softmax Hessian.
        return tf.sqrt(mean[..., k : k + 1]) * (unit - mean)

    def _sampled_gradient(
        self, eta: tf.Tensor, mean: tf.Tensor, width: int, seed: tf.Tensor
    ) -> tf.Tensor:
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

    def _label_gradient(self, mean: tf.Tensor, y_true: Any, width: int) -> tf.Tensor:
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


def _position_indicators(eta: tf.Tensor) -> list[tf.Tensor]:
    """One indicator per loss position (all axes between batch and last), or [1]."""
    positions = eta.shape[1:-1]
    if not positions.is_fully_defined():
        raise ValueError(
            f"estimation_mode='exact' needs the output's positions known when the step "
            f"is traced, got an output of shape {eta.shape}: give the model a fixed "
            "sequence length (keras.Input(shape=(T, ...))) or use estimation_mode='sampled'."
        )
    count = int(np.prod(positions))
    if count * eta.shape[-1] > MAX_EXACT_COLUMNS:
        raise ValueError(
            f"estimation_mode='exact' would take {count * eta.shape[-1]} backward passes "
            f"per step for an output of shape {eta.shape} (one per position and output "
            f"coordinate, at most {MAX_EXACT_COLUMNS}); use estimation_mode='sampled'."
        )
    if count == 1:
        return [tf.constant(1.0, eta.dtype)]
    shape = [1, *positions.as_list(), 1]
    return [tf.reshape(tf.one_hot(p, count, dtype=eta.dtype), shape) for p in range(count)]


def output_loss(loss: Any, weight: float | None = 1.0) -> OutputLoss:
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
    # A plain function (keras.losses.mean_squared_error) is reduced by Keras'
    # default; a Loss object by its own reduction.
    reduction = getattr(resolved, "reduction", "sum_over_batch_size")
    if reduction not in MEAN_REDUCTIONS + SUM_REDUCTIONS:
        raise UnsupportedLossError(
            f"Loss {getattr(resolved, 'name', kind)!r} uses reduction={reduction!r}; "
            f"K-FAC supports {', '.join(repr(r) for r in MEAN_REDUCTIONS + SUM_REDUCTIONS)} "
            "(for 'mean_with_sample_weight', normalise the sample weights to mean 1 and "
            "use 'sum_over_batch_size')."
        )
    if kwargs.get("axis", -1) != -1:
        raise UnsupportedLossError(f"Loss {kind} with axis={kwargs['axis']}: K-FAC needs axis=-1.")
    return OutputLoss(
        kind=kind,
        from_logits=bool(kwargs.get("from_logits", False)),
        weight=1.0 if weight is None else float(weight),
        label_smoothing=float(kwargs.get("label_smoothing", 0.0) or 0.0),
        reduction=reduction,
        dtype=getattr(resolved, "dtype", None) or keras.config.floatx(),
    )


# --- the model's outputs and their losses -------------------------------------------
def resolve_output_losses(
    model: keras.Model,
    loss: Any,
    loss_weights: Any,
    manual: dict[Any, tuple[Any, float]],
    num_outputs: int,
) -> list[OutputLoss | None]:
    """One `OutputLoss` (or None: no loss) per flat model output.

    `loss` and `loss_weights` are Kfac's (None: what the model is compiled
    with; given both, they must agree); `manual` holds a `LayerCollection`'s
    registered losses by output index or name, which take precedence.
    """
    compiled = getattr(model, "_compile_loss", None)
    compiled_loss = getattr(compiled, "_user_loss", None)
    compiled_weights = getattr(compiled, "_user_loss_weights", None)
    if loss is not None and compiled_loss is not None and not _same_loss(loss, compiled_loss):
        raise ValueError(
            f"Kfac(loss={loss!r}) differs from the loss the model was compiled "
            f"with ({compiled_loss!r}); pass the same loss to both, or only to compile."
        )
    if (
        loss_weights is not None
        and compiled_weights is not None
        and loss_weights != compiled_weights
    ):
        raise ValueError(
            f"Kfac(loss_weights={loss_weights!r}) differs from compile's "
            f"loss_weights={compiled_weights!r}; pass the same to both, or only to compile."
        )
    loss = loss if loss is not None else compiled_loss
    weights = loss_weights if loss_weights is not None else compiled_weights
    names = list(getattr(model, "output_names", None) or [])
    out = []
    for index in range(num_outputs):
        name = names[index] if index < len(names) else None
        if index in manual or name in manual:
            entry, weight = manual[index] if index in manual else manual[name]
        else:
            entry = _pick(loss, index, name, num_outputs, "loss")
            weight = _pick(weights, index, name, num_outputs, "loss_weights")
        out.append(None if entry is None else output_loss(entry, weight))
    if all(o is None for o in out):
        raise ValueError("Kfac found no loss: pass loss= to Kfac or to model.compile.")
    return out


def _same_loss(a: Any, b: Any) -> bool:
    def canonical(loss: Any) -> Any:
        if isinstance(loss, (list, tuple)):
            return [canonical(x) for x in loss]
        if isinstance(loss, dict):
            return {k: canonical(v) for k, v in loss.items()}
        try:
            return keras.losses.serialize(keras.losses.get(loss) if isinstance(loss, str) else loss)
        except (ValueError, TypeError):
            return repr(loss)

    return a is b or canonical(a) == canonical(b) or _kind(a) == _kind(b)


def _kind(loss: Any) -> Any:
    try:
        out = output_loss(loss)
        return (out.kind, out.from_logits, out.label_smoothing)
    except (ValueError, TypeError):
        return object()


def _pick(spec: Any, index: int, name: str | None, count: int, what: str) -> Any:
    """The entry of a loss (or loss-weight) spec for one output."""
    if spec is None or not isinstance(spec, (list, tuple, dict)):
        return spec
    if isinstance(spec, dict):
        return spec.get(name)
    if len(spec) != count:
        raise ValueError(
            f"{what} has {len(spec)} entries but the model has {count} outputs; "
            "give one per output."
        )
    return spec[index]


def align_targets(y_true: Any, y_pred: Any, output_names: Sequence[str]) -> list[Any]:
    """y_true as a flat list matching the flat model outputs."""
    flat_pred = keras.tree.flatten(y_pred)
    if len(flat_pred) == 1:
        flat_true = (
            keras.tree.flatten(y_true) if isinstance(y_true, (list, tuple, dict)) else [y_true]
        )
        return flat_true[:1]
    if isinstance(y_true, dict) and not isinstance(y_pred, dict):
        return [y_true.get(name) for name in output_names]
    return keras.tree.flatten(y_true)


def align_weights(sample_weight: Any, count: int, output_names: Sequence[str]) -> list[Any]:
    """The sample weights as a flat list, one entry (or None) per flat model output."""
    if sample_weight is None or not isinstance(sample_weight, (list, tuple, dict)):
        return [sample_weight] * count
    if isinstance(sample_weight, dict):
        return [sample_weight.get(name) for name in output_names]
    return list(sample_weight)
