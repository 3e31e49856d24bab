"""The pseudo-loss whose gradients give the curvature statistics, and the factors' weights.

Back-propagating Σ⟨u, η⟩ (u drawn per `estimation_mode`, η each output's
natural parameters, see `losses`) gives at every recorded pre-activation
the output-side vectors of the Kronecker factors, and at a generic block's
variables its signed gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import tensorflow as tf

from kfac_dist.linalg import curvature_dtype
from kfac_dist.losses import EXACT, OutputLoss, align_targets, align_weights


def pseudo_losses(
    model: keras.Model,
    output_losses: Sequence[OutputLoss | None],
    estimation_mode: str,
    y_pred: Any,
    y_true: Any,
    sample_weight: Any,
    seed: tf.Tensor,
) -> tuple[list[tf.Tensor], list[Any]]:
    """Σ⟨u, η⟩ over outputs (one per output column in exact mode, else one), and
    each output's effective weights (sample weights with its Keras mask applied).

    `seed` is this replica's and this call's. Each example's vectors carry an
    independent random sign: Kronecker and per-example statistics are
    unchanged by it, and it makes the diagonal estimate of generic blocks
    unbiased (see blocks/diagonal.py).
    """
    flat_pred = keras.tree.flatten(y_pred)
    output_names = list(getattr(model, "output_names", None) or [])
    flat_true = align_targets(y_true, y_pred, output_names)
    flat_weights = align_weights(sample_weight, len(flat_pred), output_names)
    batch = tf.shape(flat_pred[0])[0]
    draws = tf.random.stateless_uniform([batch], tf.random.experimental.stateless_fold_in(seed, -1))
    signs = 2.0 * tf.cast(draws < 0.5, curvature_dtype()) - 1.0
    columns: list[tf.Tensor] = []
    effective: list[Any] = []
    for index, (loss, pred, true, weight) in enumerate(
        zip(output_losses, flat_pred, flat_true, flat_weights)
    ):
        if loss is None:
            effective.append(weight)
            continue
        weight = loss.effective_weights(pred, weight)
        effective.append(weight)
        eta = loss.natural_params(pred)
        output_seed = tf.random.experimental.stateless_fold_in(seed, index)
        sign = tf.reshape(signs, [-1] + [1] * (eta.shape.rank - 1))
        vectors = loss.vectors(eta, true, weight, estimation_mode, output_seed)
        columns.extend(tf.reduce_sum(sign * u * eta) for u in vectors)
    if estimation_mode != EXACT:
        columns = [tf.add_n(columns)]
    return columns, effective


def input_factor_weights(
    effective_weights: Sequence[Any],
    output_losses: Sequence[OutputLoss | None],
    sample_weight: Any,
) -> Any:
    """The weights of the Kronecker input factors: the loss's, when one output has a loss.

    With one loss, its effective weights (sample weights times a Keras mask,
    per example or per position) weight A row by row. With several, only a
    single `sample_weight` shared by every output does; per-output weights
    still weight each output's pseudo-loss.
    """
    with_loss = [w for w, loss in zip(effective_weights, output_losses) if loss is not None]
    if len(with_loss) == 1:
        return with_loss[0]
    if sample_weight is None or isinstance(sample_weight, (list, tuple, dict)):
        return None
    return sample_weight


def example_weight_total(weights: Any, batch_size: tf.Tensor) -> tf.Tensor | None:
    """Σ_i (mean weight of example i): what the input factors are normalised by."""
    if weights is None:
        return None
    w = tf.cast(weights, curvature_dtype())
    # Not [b, -1]: a replica with no examples cannot infer the -1.
    per_example = tf.size(w) // tf.maximum(batch_size, 1)
    return tf.reduce_sum(tf.reduce_mean(tf.reshape(w, tf.stack([batch_size, per_example])), axis=1))
