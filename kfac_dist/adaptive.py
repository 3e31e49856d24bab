"""Adaptive K-FAC: quadratic-model momentum and Levenberg–Marquardt damping.

Quadratic-model ("qmodel") momentum (Martens & Grosse 2015, §7): the update
is v = α·Δ + μ·δ, Δ the preconditioned gradient and δ the previous update,
with (α, μ) minimising q(v) = ½ vᵀ(F + λI)v + ∇ᵀv over that 2-D subspace.
vᵀFw are exact GGN products on the current batch: (Jv)ᵀ ∇²_η L (Jw), with
Jv from forward-mode differentiation through the model. Levenberg–Marquardt
damping compares the real change of the loss with the model's prediction,
ρ = (L(θ+v) − L(θ)) / q(v), and moves λ by ω = decay^interval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module

from kfac_dist import strategies
from kfac_dist.losses import OutputLoss, align_targets, align_weights
from kfac_dist.options import (  # noqa: F401  (the momentum types, with the quadratic model)
    MOMENTUM_TYPES,
    QMODEL,
    QMODEL_FIXED_MU,
    REGULAR,
)


def solve_qmodel(
    quadratic: tf.Tensor, linear: tf.Tensor, fixed_mu: tf.Tensor | None = None
) -> tuple[tf.Tensor, tf.Tensor]:
    """(α, μ) minimising ½ cᵀMc + bᵀc over c = (α, μ).

    `quadratic` is the 2×2 M = [ΔᵀCΔ, ΔᵀCδ; δᵀCΔ, δᵀCδ] (C = F + λI) and
    `linear` b = (∇ᵀΔ, ∇ᵀδ). With δ = 0 (the first step) the system is 1-D.
    With `fixed_mu`, only α is solved for.
    """
    m00, m01, m11 = quadratic[0, 0], quadratic[0, 1], quadratic[1, 1]
    b0, b1 = linear[0], linear[1]
    if fixed_mu is not None:
        mu = tf.cast(fixed_mu, m00.dtype)
        alpha = -(b0 + mu * m01) / m00
    else:
        det = m00 * m11 - m01 * m01
        degenerate = tf.logical_or(m11 <= 0, det <= 1e-12 * tf.abs(m00 * m11))
        safe_det = tf.where(degenerate, tf.ones_like(det), det)
        alpha = tf.where(degenerate, -b0 / m00, -(m11 * b0 - m01 * b1) / safe_det)
        mu = tf.where(degenerate, tf.zeros_like(det), -(m00 * b1 - m01 * b0) / safe_det)
    return alpha, mu


def quadratic_change(
    quadratic: tf.Tensor, linear: tf.Tensor, alpha: tf.Tensor, mu: tf.Tensor
) -> tf.Tensor:
    """½ cᵀMc + bᵀc at c = (α, μ): the change the quadratic model predicts."""
    coefficients = tf.stack([alpha, mu])
    change = 0.5 * tf.tensordot(coefficients, tf.linalg.matvec(quadratic, coefficients), 1)
    return change + tf.tensordot(linear, coefficients, 1)


def adapt_damping(
    damping: tf.Tensor,
    rho: tf.Tensor,
    *,
    interval: int,
    decay: float,
    min_damping: float,
) -> tf.Tensor:
    """λ·ω if ρ > 3/4, λ/ω if ρ < 1/4 or ρ is NaN (ω = decay^interval), ≥ min_damping."""
    omega = tf.constant(decay**interval, damping.dtype)
    damping = tf.where(rho > 0.75, damping * omega, damping)
    damping = tf.where(tf.logical_or(rho < 0.25, tf.math.is_nan(rho)), damping / omega, damping)
    return tf.maximum(damping, tf.constant(min_damping, damping.dtype))


def model_state(model: keras.Model) -> list[tf.Tensor]:
    """A snapshot of the model's non-trainable state: random seeds, BN moments."""
    return [tf.identity(v.value) for v in model.non_trainable_variables]


@contextlib.contextmanager
def measurement(model: keras.Model, start: Sequence[tf.Tensor] | None = None) -> Iterator[None]:
    """A measurement pass: from the state `start` (if given), restored afterwards.

    Training-mode forward passes move BatchNormalization's moving moments and
    advance the seed generators of Dropout and other random layers; the extra
    passes of the adaptive mode must do neither, and starting them from the
    state the step's own forward pass started from gives them its random draws
    (the same dropout masks), so that they measure the same function.
    """
    saved = model_state(model)
    if start is not None:
        for var, value in zip(model.non_trainable_variables, start):
            var.assign(value)
    yield
    for var, value in zip(model.non_trainable_variables, saved):
        var.assign(value)


def output_tangents(
    model: keras.Model,
    x: Any,
    variables: Sequence[Any],
    tangents: Sequence[tf.Tensor],
    output_losses: Sequence[OutputLoss | None],
    start: Sequence[tf.Tensor] | None = None,
) -> tuple[list[tf.Tensor | None], list[tf.Tensor | None]]:
    """J v: the tangent of each output's natural parameters for a weight tangent v.

    The forward pass runs in training mode (as the loss does), as a
    measurement from the step's starting state (see `measurement`).
    """
    primals = [v.value if isinstance(v, keras.Variable) else v for v in variables]
    with measurement(model, start):
        with tf.autodiff.ForwardAccumulator(primals, list(tangents)) as accumulator:
            predictions = keras.tree.flatten(model(x, training=True))
            etas = [
                None if loss is None else loss.natural_params(pred)
                for loss, pred in zip(output_losses, predictions)
            ]
        out = [
            None if eta is None else accumulator.jvp(eta, unconnected_gradients="zero")
            for eta in etas
        ]
    return out, etas


def fisher_products(
    output_losses: Sequence[OutputLoss | None],
    etas: Sequence[tf.Tensor | None],
    tangents_a: Sequence[tf.Tensor | None],
    tangents_b: Sequence[tf.Tensor | None],
    sample_weights: Sequence[Any],
    batch_size: tf.Tensor,
) -> tf.Tensor:
    """aᵀ F b = Σ_outputs (J a)ᵀ ∇²_η L (J b), L the local batch's compiled loss."""
    dtypes = {eta.dtype for eta in etas if eta is not None}
    total = tf.constant(0.0, tf.float64 if tf.float64 in dtypes else tf.float32)
    for loss, eta, ja, jb, weight in zip(
        output_losses, etas, tangents_a, tangents_b, sample_weights
    ):
        if loss is None:
            continue
        product = loss.hessian_product(tf.stop_gradient(eta), ja, jb, weight)
        total += tf.cast(product, total.dtype)
    return total / tf.cast(batch_size, total.dtype)


def flat_dot(a: Sequence[Any], b: Sequence[Any], dtype: Any) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(tf.cast(x, dtype) * tf.cast(y, dtype)) for x, y in zip(a, b)])


def weight_decay_loss(
    variables: Sequence[Any], weight_decay: tf.Tensor | None, dtype: tf.DType
) -> tf.Tensor:
    """½·wd·‖θ‖², the coupled weight decay's term of the objective (0 without one)."""
    if weight_decay is None:
        return tf.constant(0.0, dtype)
    return 0.5 * tf.cast(weight_decay, dtype) * flat_dot(variables, variables, dtype)


class QuadraticModel(NamedTuple):
    """The quadratic model's step on one batch, identical on every replica."""

    alpha: tf.Tensor
    mu: tf.Tensor
    change: tf.Tensor  # the change of the loss it predicts: ρ's denominator
    loss_before: tf.Tensor  # the objective before the step, averaged over replicas


def qmodel_coefficients(
    model: keras.Model,
    x: Any,
    start_state: Sequence[tf.Tensor] | None,
    sample_weights: Sequence[Any],
    batch_size: tf.Tensor,
    loss: tf.Tensor,
    output_losses: Sequence[OutputLoss | None],
    *,
    variables: Sequence[Any],
    gradients: Sequence[tf.Tensor],
    directions: Sequence[tf.Tensor | None],
    velocities: Sequence[tf.Tensor],
    inner: tf.Tensor,
    damping: Any,
    weight_decay: Any,
    fixed_momentum: Any,
    include_damping: bool,
    context: strategies.CrossReplicaContext,
) -> QuadraticModel:
    """(α, μ) minimising the quadratic model over v = α·Δ + μ·δ on this batch.

    Δ are the preconditioned `directions`, δ the previous update
    (`velocities`), `inner` = ⟨Δ, ∇⟩. The Fisher terms ΔᵀFΔ, ΔᵀFδ, δᵀFδ are
    local (this replica's batch, forward passes from `start_state` so that
    they draw the step's own dropout masks); one small all-reduce averages
    them with `loss`. With `weight_decay` (coupled) the model is that of
    L + ½·wd·‖θ‖²; `fixed_momentum` fixes μ.
    """
    dtype = inner.dtype
    kept = [i for i, d in enumerate(directions) if d is not None]
    delta = [directions[i] for i in kept]
    previous = [velocities[i] for i in kept]
    tangent_variables = [variables[i] for i in kept]
    j_delta, etas = output_tangents(model, x, tangent_variables, delta, output_losses, start_state)
    j_prev, _ = output_tangents(model, x, tangent_variables, previous, output_losses, start_state)
    loss_before = tf.cast(loss, dtype) + weight_decay_loss(variables, weight_decay, dtype)
    terms = tf.stack(
        [
            tf.cast(fisher_products(output_losses, etas, ja, jb, sample_weights, batch_size), dtype)
            for ja, jb in ((j_delta, j_delta), (j_delta, j_prev), (j_prev, j_prev))
        ]
        + [loss_before]
    )
    terms = context.all_reduce_sum([terms], strategies.ADAPTIVE)[0] / context.num_replicas
    decay = tf.cast(0.0 if weight_decay is None else weight_decay, dtype)
    dd = flat_dot(delta, delta, dtype)
    dp = flat_dot(delta, previous, dtype)
    pp = flat_dot(previous, previous, dtype)
    # M = [ΔᵀCΔ, ΔᵀCδ; δᵀCΔ, δᵀCδ] with C = F + wd·I (the objective's
    # curvature), damped by λI for solving.
    curvature = tf.stack(
        [
            tf.stack([terms[0] + decay * dd, terms[1] + decay * dp]),
            tf.stack([terms[1] + decay * dp, terms[2] + decay * pp]),
        ]
    )
    norms = tf.stack([tf.stack([dd, dp]), tf.stack([dp, pp])])
    damped = curvature + tf.cast(damping, dtype) * norms
    linear = tf.stack([inner, flat_dot([gradients[i] for i in kept], previous, dtype)])
    alpha, mu = solve_qmodel(damped, linear, fixed_momentum)
    change = quadratic_change(damped if include_damping else curvature, linear, alpha, mu)
    return QuadraticModel(alpha, mu, change, terms[3])


def reduction_ratio(
    loss_after: tf.Tensor,
    loss_before: tf.Tensor,
    predicted_change: tf.Tensor,
    *,
    variables: Sequence[Any],
    weight_decay: Any,
    context: strategies.CrossReplicaContext,
) -> tf.Tensor:
    """ρ = (L(θ+v) − L(θ)) / q(v), with this replica's `loss_after` averaged over replicas.

    `loss_before` is already averaged (`QuadraticModel.loss_before`); with
    coupled `weight_decay`, ½·wd·‖θ‖² joins the loss after as it joined the
    loss before. A zero predicted change gives ρ = 0.
    """
    dtype = predicted_change.dtype
    after = tf.cast(loss_after, dtype) + weight_decay_loss(variables, weight_decay, dtype)
    after = context.all_reduce_sum([tf.reshape(after, [1])], strategies.ADAPTIVE)[0][0]
    after = after / context.num_replicas
    return tf.math.divide_no_nan(after - tf.cast(loss_before, dtype), predicted_change)


def compiled_loss(
    model: keras.Model,
    x: Any,
    y: Any,
    sample_weight: Any,
    start_state: Sequence[tf.Tensor] | None = None,
) -> tf.Tensor:
    """The compiled loss of the current weights on (x, y), as a measurement.

    The same quantity as the loss the step logs: Keras' per-output losses and
    regularisation losses, with Keras' per-replica scaling undone, in the
    loss's own dtype. The forward pass starts from `start_state` (the step's
    random draws) and leaves no trace: no metric update, no moved
    BatchNormalization moments, no advanced seed.
    """
    with measurement(model, start_state):
        y_pred = model(x, training=True)
        regularisation = [
            model._aggregate_additional_loss(loss)  # noqa: SLF001
            for loss in model.losses
        ]
    flat_pred = keras.tree.flatten(y_pred)
    output_names = list(getattr(model, "output_names", None) or [])
    flat_true = align_targets(y, y_pred, output_names)
    flat_weights = align_weights(sample_weight, len(flat_pred), output_names)
    values = list(regularisation)
    for entry in model._compile_loss._flat_losses:  # noqa: SLF001
        index = 0
        if entry.path and isinstance(entry.path[0], int):
            index = entry.path[0]
        elif entry.path and isinstance(entry.path[0], str):
            index = output_names.index(entry.path[0])
        value = entry.loss(flat_true[index], flat_pred[index], flat_weights[index])
        if entry.loss_weights is not None:
            value = value * entry.loss_weights
        values.append(value)
    dtype = values[-1].dtype
    total = tf.add_n([tf.reduce_sum(tf.cast(v, dtype)) for v in values])
    return keras_loss_module.unscale_loss_for_distribution(total)
