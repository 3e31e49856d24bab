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
from collections.abc import Sequence

import keras
import tensorflow as tf

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


def model_state(model) -> list[tf.Tensor]:
    """A snapshot of the model's non-trainable state: random seeds, BN moments."""
    return [tf.identity(v.value) for v in model.non_trainable_variables]


@contextlib.contextmanager
def measurement(model, start: Sequence[tf.Tensor] | None = None):
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
    model, x, variables, tangents, output_losses, start=None
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
    output_losses, etas, tangents_a, tangents_b, sample_weights, batch_size
) -> tf.Tensor:
    """aᵀ F b = Σ_outputs (J a)ᵀ ∇²_η L (J b), L the local batch's compiled loss."""
    total = tf.constant(0.0, tf.float64 if etas[0].dtype == tf.float64 else tf.float32)
    for loss, eta, ja, jb, weight in zip(
        output_losses, etas, tangents_a, tangents_b, sample_weights
    ):
        if loss is None:
            continue
        product = loss.hessian_product(tf.stop_gradient(eta), ja, jb, weight)
        total += tf.cast(product, total.dtype)
    return total / tf.cast(batch_size, total.dtype)


def flat_dot(a: Sequence[tf.Tensor], b: Sequence[tf.Tensor], dtype) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(tf.cast(x, dtype) * tf.cast(y, dtype)) for x, y in zip(a, b)])
