"""One K-FAC step, phase by phase, with the data each phase hands to the next.

`kfac_train_step` is the train step `Kfac` installs on its model. It runs
the phases on one replica's batch, in order:

1. capture: the forward pass records each block's inputs and pre-activations;
2. loss and gradients: the compiled loss and its gradients, from one tape;
3. statistics (on factor-update steps): gradients of a pseudo-loss drawn from
   the model's predictive distribution, and each block's batch statistics;
then hands `StepInputs` to `Kfac.apply_step`, whose update (`update`) runs

4. the gradient all-reduce, which also carries each replica's finiteness;
5. the fold of the statistics into the factors (unless a replica saw a
   non-finite value);
6. on inverse-update steps: the factor sync, each owner's inversions and the
   sharing of the inverses;
7. preconditioning;
8. the step size: the KL clip, or the quadratic model's (α, μ);
9. the update of the velocities and weights;
and returns a `StepOutcome`, with which the train step ends by

10. the loss scale's rules (mixed_float16) and the damping adaptation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from kfac_dist import adaptive, capture, linalg, loss_scaling, pseudo_loss, registration
from kfac_dist.curvature import BatchStatistics
from kfac_dist.linalg import curvature_dtype

if TYPE_CHECKING:
    from kfac_dist.optimizer import Kfac

#: Name scope of the inverse update's `tf.cond`, so tools can find it in a graph.
INVERSE_UPDATE_SCOPE = "kfac_inverse_update"


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """What phases 1–3 hand to the update: one replica's batch, loss and statistics."""

    model: keras.Model
    x: Any
    y_pred: Any
    #: Each output's effective weights: its sample weights times its Keras mask.
    sample_weights: list[tf.Tensor | None]
    #: The model's random state before the forward pass (quadratic model only):
    #: its extra forward passes draw the same dropout masks.
    start_state: list[tf.Tensor] | None
    batch_size: tf.Tensor
    #: This replica's loss, Keras' per-replica scaling undone (a sum over a
    #: loss with reduction=None, as Keras' gradient is).
    loss: tf.Tensor
    #: Whether the gradients come from a loss scaled by mixed_float16's scale.
    loss_scaled: bool
    statistics: BatchStatistics
    is_statistics_step: tf.Tensor
    #: This update's index (`Kfac.iterations` before it).
    index: tf.Tensor


@dataclasses.dataclass(frozen=True)
class StepOutcome:
    """What the update hands back to the train step (identical on every replica)."""

    #: Whether the update was applied: every replica's gradients and statistics were finite.
    finite: tf.Tensor
    #: The loss before the step averaged over replicas (quadratic model only), for ρ.
    loss_before: tf.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class _Directions:
    """Phases 4–8's result: what the weights move along, and by how much."""

    directions: list[tf.Tensor]
    scale: tf.Tensor  # s of v = μv + s·(d + wd·θ)
    momentum: tf.Tensor  # μ
    finite: tf.Tensor
    #: clip·∇ of each registered variable, for F̂v (KL clip only, else empty).
    curvature_gradients: list[tf.Tensor]
    loss_before: tf.Tensor | None = None


def kfac_of(optimizer: keras.optimizers.Optimizer | None) -> Kfac | None:
    """The Kfac that trains (part of) a model: its optimizer, or the one in its MultiOptimizer."""
    if getattr(optimizer, "is_kfac", False):
        return optimizer
    if not isinstance(optimizer, keras.optimizers.MultiOptimizer):
        return None
    members = [o for o in optimizer.optimizers if getattr(o, "is_kfac", False)]
    if len(members) > 1:
        raise ValueError(
            f"The MultiOptimizer holds {len(members)} Kfac optimizers; one Kfac trains "
            "all of a model's K-FAC layers (one curvature estimate, one placement): map "
            "every layer K-FAC should train to the same Kfac, with per-layer "
            "fisher_approx for different approximations."
        )
    return members[0] if members else None


def kfac_train_step(model: keras.Model, data: Any) -> dict[str, Any]:
    """Keras `train_step` with K-FAC's curvature work (installed per instance).

    Also the hook for a model whose class has its own `train_step`: decorated
    with `calls_kfac_step`, that step calls `kfac_train_step(self, data)` for
    the forward pass, the curvature and the update, and does its own work
    around it. Returns Keras' metrics; K-FAC's own state joins them on the host.
    """
    # Kfac, a MultiOptimizer holding it, or the LossScaleOptimizer mixed_float16 wraps it in.
    optimizer = model.optimizer
    kfac = kfac_of(loss_scaling.inner_optimizer(optimizer))
    if kfac is None or not kfac.trains(model):
        # Keras' own step: `type(model).train_step` may be a user step that called this hook.
        return keras.Model.train_step(model, data)
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    if not optimizer.built:
        # A model that builds late (subclassed, Sequential without an Input,
        # model.build(shape)) has no variables yet: create them first, so
        # that registration sees its layers. A MultiOptimizer (first built
        # here without a strategy) gives K-FAC its share.
        registration.build_from_batch(model, x)
        optimizer.build(model.trainable_variables)
    config, curvature = kfac.config, kfac.curvature
    batch_size = tf.shape(next(t for t in keras.tree.flatten(x) if t is not None))[0]
    kfac.check_batch_size(batch_size)
    # This update's index, read before the update (with gradient accumulation,
    # all k micro-batches of an update share it).
    index = tf.identity(kfac.iterations)
    # Under mixed_float16 the loss is scaled, the pseudo-loss is not (see loss_scaling).
    scale = loss_scaling.loss_scale(optimizer)
    if scale is not None:
        _check_loss_scaling(optimizer, kfac)
    # The quadratic model's extra forward passes start from this state.
    start_state = adaptive.model_state(model) if config.uses_qmodel else None

    with tf.GradientTape(persistent=True) as tape:
        # 1. Capture: each block's inputs and pre-activations, as the layers run.
        with capture.recording(curvature.blocks) as records:
            y_pred = model(x, training=True) if model._call_has_training_arg else model(x)  # noqa: SLF001
        # 2. Loss (and below, its gradients).
        loss = model._compute_loss(  # noqa: SLF001
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(  # noqa: SLF001
            keras_loss_module.unscale_loss_for_distribution(loss), sample_weight=batch_size
        )
        loss_value = loss
        if scale is not None:
            loss = loss * tf.cast(scale, loss.dtype)
        output_losses = kfac.output_losses(len(keras.tree.flatten(y_pred)))
        # Each call (micro-batch) draws its own samples.
        seed = tf.stack([tf.cast(kfac.seed, tf.int64), tf.cast(kfac._iterations, tf.int64)])  # noqa: SLF001
        pseudo, effective_weights = pseudo_loss.pseudo_losses(
            model,
            output_losses,
            config.estimation_mode,
            y_pred,
            y,
            sample_weight,
            tf.random.experimental.stateless_fold_in(seed, curvature.context.replica_id()),
        )
    gradients = tape.gradient(loss, model.trainable_weights)
    if scale is not None:
        gradients = [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]

    # 3. Statistics, on factor-update steps: the pseudo-loss's gradients at
    # each layer block's recorded pre-activations (or at a generic block's
    # variables), and each block's batch statistics.
    def batch_statistics() -> BatchStatistics:
        targets = [
            [r.outputs for r in block_records] if block.layer is not None else block.variables
            for block, block_records in zip(curvature.blocks, records)
        ]
        flat_targets = [t for block_targets in targets for t in block_targets]
        per_column = [tape.gradient(p, flat_targets, unconnected_gradients="zero") for p in pseudo]
        stacked = iter(
            tf.stack([tf.convert_to_tensor(column[i]) for column in per_column])
            for i in range(len(flat_targets))
        )
        weights = pseudo_loss.input_factor_weights(effective_weights, output_losses, sample_weight)
        statistics = []
        for block, block_records, block_targets in zip(curvature.blocks, records, targets):
            output_grads = [next(stacked) for _ in block_targets]
            statistics.extend(block.statistics(block_records, output_grads, batch_size, weights))
        total = pseudo_loss.example_weight_total(weights, batch_size)
        return curvature.batch_statistics(statistics, batch_size, total)

    if config.cov_update_every == 1:
        statistics, is_statistics_step = batch_statistics(), tf.constant(True)
    else:
        is_statistics_step = tf.equal(index % config.cov_update_every, 0)
        statistics = tf.cond(is_statistics_step, batch_statistics, curvature.empty_statistics)
    inputs = StepInputs(
        model=model,
        x=x,
        y_pred=y_pred,
        sample_weights=effective_weights,
        start_state=start_state,
        batch_size=batch_size,
        loss=tf.reduce_sum(keras_loss_module.unscale_loss_for_distribution(loss_value)),
        loss_scaled=scale is not None,
        statistics=statistics,
        is_statistics_step=is_statistics_step,
        index=index,
    )
    # 4–9: the update, through Keras' optimizer plumbing (see `update`).
    outcome = _apply(optimizer, kfac, gradients, model.trainable_weights, inputs)

    # 10. The loss scale's rules, and the damping adaptation, on the shared decision.
    if scale is not None:
        loss_scaling.finish_step(optimizer, outcome.finite)
    if config.adapt_damping:
        adapt_now = tf.equal((index + 1) % config.damping_adaptation_interval, 0)
        if scale is not None:
            # A step the loss scale rejects changed nothing, nor does it change the damping.
            adapt_now = tf.logical_and(adapt_now, outcome.finite)

        def adapt() -> tf.Operation:
            after = adaptive.compiled_loss(model, x, y, sample_weight, start_state)
            _adapt_damping(kfac, model, after, outcome.loss_before)
            return tf.no_op()

        tf.cond(adapt_now, adapt, tf.no_op)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _apply(
    optimizer: keras.optimizers.Optimizer,
    kfac: Kfac,
    gradients: Sequence[tf.Tensor | None],
    variables: Sequence[keras.Variable],
    inputs: StepInputs,
) -> StepOutcome:
    """Kfac's update with this step's inputs; in a MultiOptimizer, the others' updates too."""
    if optimizer is kfac or isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # The loss scale wrapper's own apply would decide on this replica's gradients alone.
        return kfac.apply_step(gradients, variables, inputs)
    # A MultiOptimizer: each member updates its share, as its own `apply` would.
    shares: list[list[tuple[tf.Tensor | None, keras.Variable]]] = [[] for _ in optimizer.optimizers]
    for gradient, variable in zip(gradients, variables):
        member = optimizer._var_to_optimizer_idx[optimizer._var_key(variable)]  # noqa: SLF001
        shares[member].append((gradient, variable))
    outcome = StepOutcome(finite=tf.constant(True))
    for member, share in zip(optimizer.optimizers, shares):
        if not share:
            continue
        member_gradients, member_variables = (list(part) for part in zip(*share))
        if member is kfac:
            outcome = kfac.apply_step(member_gradients, member_variables, inputs)
        else:
            member.apply(member_gradients, member_variables)
    optimizer.iterations.assign_add(1)
    return outcome


def _check_loss_scaling(optimizer: keras.optimizers.Optimizer, kfac: Kfac) -> None:
    """mixed_float16's loss scaling with what it is not built for: a clear error."""
    if not getattr(loss_scaling.inner_optimizer(optimizer), "is_kfac", False):
        raise ValueError(
            "mixed_float16 wrapped a MultiOptimizer holding Kfac in a LossScaleOptimizer: "
            "K-FAC's loss scaling covers a Kfac that trains the whole model only. Use the "
            "mixed_bfloat16 policy (no loss scaling), or let Kfac train every layer."
        )
    if kfac.config.gradient_accumulation_steps:
        raise ValueError(
            "mixed_float16 with Kfac(gradient_accumulation_steps=...) is not supported: a "
            "rejected micro-batch would have to discard the whole accumulated update. Use "
            "the mixed_bfloat16 policy (no loss scaling), or a larger batch per step."
        )


def update(
    kfac: Kfac,
    grads: Sequence[tf.Tensor],
    variables: Sequence[tf.Variable],
    learning_rate: tf.Tensor,
    inputs: StepInputs | None,
) -> StepOutcome:
    """Phases 4–9 on one replica: what `Kfac.apply_step` runs once Keras has filtered the gradients.

    `inputs` is None when `apply_gradients` is called outside the train
    step: then nothing is folded and nothing inverted.
    """
    # A sparse gradient (an Embedding's, unscaled by the loss scale) can lose
    # its static shape when made dense; the variable's is the gradient's.
    grads = [tf.ensure_shape(tf.convert_to_tensor(g), v.shape) for g, v in zip(grads, variables)]
    accumulators: list[tuple[tf.Tensor, keras.Variable]] = []
    if kfac.config.gradient_accumulation_steps:
        result, accumulators = _accumulated_directions(
            kfac, grads, variables, learning_rate, inputs
        )
    else:
        result = _directions(kfac, grads, variables, learning_rate, inputs)
    # 9. Velocities and weights (and F̂v), on every replica from identical values.
    kfac.update_variables(
        result.directions,
        variables,
        (result.scale, result.momentum, result.finite),
        accumulators,
        result.curvature_gradients,
    )
    return StepOutcome(finite=result.finite, loss_before=result.loss_before)


def _curvature_schedule(
    kfac: Kfac, inputs: StepInputs | None
) -> tuple[BatchStatistics, tf.Tensor, tf.Tensor]:
    """(statistics, whether to fold them, whether to invert) for this update."""
    if inputs is None:
        return kfac.curvature.empty_statistics(), tf.constant(False), tf.constant(False)
    if kfac.config.stagger_inverses and kfac.config.invert_every > 1:
        # Staggered: every step inverts its slot's units (all of them at the first).
        return inputs.statistics, inputs.is_statistics_step, tf.constant(True)
    is_inverse_step = tf.equal(inputs.index % kfac.config.invert_every, 0)
    return inputs.statistics, inputs.is_statistics_step, is_inverse_step


def _directions(
    kfac: Kfac,
    grads: Sequence[tf.Tensor],
    variables: Sequence[tf.Variable],
    learning_rate: tf.Tensor,
    inputs: StepInputs | None,
    curvature_step: tuple[BatchStatistics, tf.Tensor, tf.Tensor] | None = None,
    conditional: bool = False,
) -> _Directions:
    """Phases 4–8: the all-reduced, preconditioned (and clipped) directions and coefficients.

    `conditional`: called inside a `tf.cond` (see
    `CrossReplicaContext.all_reduce_gradients`).
    """
    config, curvature, state = kfac.config, kfac.curvature, kfac.state
    statistics, is_statistics_step, is_inverse_step = curvature_step or _curvature_schedule(
        kfac, inputs
    )
    # 4. The one gradient all-reduce. This replica's non-finite statistics
    # travel inside it: every replica then skips the same steps, with no
    # extra collective (a replica that skipped alone would skew the factors).
    local_bad = tf.cast(tf.logical_not(statistics.finite), grads[0].dtype)
    *grads, bad = kfac.context.all_reduce_gradients([*grads, local_bad], conditional)
    finite = tf.logical_and(
        tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]), tf.equal(bad, 0)
    )
    grads = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
    if inputs is not None and inputs.loss_scaled:
        # A step the loss scale rejects is no step (`loss_scaling.finish_step`):
        # the inverse update due runs at the next step, which has this index.
        is_inverse_step = tf.logical_and(is_inverse_step, finite)
    if config.coupled_weight_decay:
        decay = kfac.weight_decay_coeff
        grads = [g + tf.cast(decay, g.dtype) * v for g, v in zip(grads, variables)]

    # 5. Fold the batch statistics into the factors' moving sums.
    curvature.fold(statistics, tf.logical_and(is_statistics_step, finite))

    # 6. Sync, inversion and sharing, on inverse-update steps: one packed
    # all-reduce of the factor sums, each owner inverts the factors the
    # placement gave it, and one sharing phase brings every inverse to every replica.
    # Inverses this process has not computed yet (distributed ones after a
    # restore) are computed now, whatever the schedule.
    needs_inverses = curvature.needs_inverses()

    def update_inverses() -> tf.Operation:
        slot = None
        if inputs is not None and config.stagger_inverses and config.invert_every > 1:
            index = tf.cast(inputs.index, tf.int64)
            every = tf.logical_or(tf.equal(index, 0), needs_inverses)
            slot = tf.where(every, tf.constant(-1, tf.int64), index % config.invert_every)
        curvature.update_inverses(kfac.damping_value(), slot)
        return tf.no_op()

    with tf.name_scope(INVERSE_UPDATE_SCOPE):
        tf.cond(tf.logical_or(is_inverse_step, needs_inverses), update_inverses, tf.no_op)

    # 7. Precondition each block's gradients: P∇ = F̂⁻¹∇.
    # A block variable without a gradient (Keras leaves it out of the update:
    # a use of a shared layer the model never calls) counts as a zero gradient.
    position = {index: i for i, index in enumerate(kfac.variable_indices(variables))}
    block_grads = [
        [
            grads[position[i]] if i in position else tf.zeros_like(state.velocities[i])
            for i in indices
        ]
        for indices in state.block_indices
    ]
    preconditioned = curvature.precondition(block_grads, kfac.damping)
    directions = list(grads)
    inner = tf.constant(0.0, curvature_dtype())  # ⟨P∇, ∇⟩
    for indices, block_grad, block_pre in zip(state.block_indices, block_grads, preconditioned):
        for i, g, p in zip(indices, block_grad, block_pre):
            if i in position:
                directions[position[i]] = tf.cast(p, g.dtype)
                inner += tf.reduce_sum(tf.cast(p * g, inner.dtype))

    # 8. The step size: the KL clip of the whole step μv − lr·P∇ (regular
    # momentum), or the quadratic model's (α, μ).
    registered = [position[i] for indices in state.block_indices for i in indices if i in position]
    loss_before = None
    if config.uses_qmodel:
        state.kl_clip.assign(tf.ones_like(state.kl_clip))
        clip = tf.constant(1.0, inner.dtype)
        scale, momentum, loss_before = _qmodel_coefficients(
            kfac, grads, directions, variables, inner, inputs
        )
    else:
        clip = _kl_clip(kfac, grads, registered, inner, learning_rate)
        directions = [d * tf.cast(clip, d.dtype) for d in directions]
        state.kl_clip.assign(tf.where(finite, clip, state.kl_clip))
        scale = -tf.cast(learning_rate, inner.dtype)
        momentum = tf.cast(kfac.momentum, inner.dtype) * clip
    state.skipped_updates.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
    # F̂·(clip·P∇) = clip·∇: F̂v follows the velocity with the gradients.
    curvature_gradients = (
        [grads[i] * tf.cast(clip, grads[i].dtype) for i in registered] if config.clips_kl else []
    )
    return _Directions(directions, scale, momentum, finite, curvature_gradients, loss_before)


def _kl_clip(
    kfac: Kfac,
    grads: Sequence[tf.Tensor],
    registered: Sequence[int],
    inner: tf.Tensor,
    learning_rate: tf.Tensor,
) -> tf.Tensor:
    """The KL clip of this step, momentum included (`linalg.kl_clip_factor`); 1 without a bound.

    Identical on every replica: ∇ is all-reduced, v and F̂v are shared
    state. F̂v is exact while the inverses stay the same, an estimate from
    the previous inverses for a few steps after each inverse update.
    """
    if not kfac.config.clips_kl:
        return tf.constant(1.0, inner.dtype)
    state = kfac.state
    velocities = [state.velocities[i] for i in state.registered]
    velocity_gradient = adaptive.flat_dot(velocities, [grads[i] for i in registered], inner.dtype)
    velocity_curvature = adaptive.flat_dot(
        velocities, [state.velocity_curvatures[i] for i in state.registered], inner.dtype
    )
    return linalg.kl_clip_factor(
        inner,
        learning_rate,
        kfac.norm_constraint,
        kfac.momentum,
        velocity_gradient,
        velocity_curvature,
    )


def _qmodel_coefficients(
    kfac: Kfac,
    grads: Sequence[tf.Tensor],
    directions: Sequence[tf.Tensor],
    variables: Sequence[tf.Variable],
    inner: tf.Tensor,
    inputs: StepInputs | None,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(α, μ) of the quadratic model on this batch and the loss before the step."""
    if inputs is None:
        raise ValueError(
            "Kfac with quadratic-model momentum (adaptive=True) updates only inside its "
            "train step (model.fit, train_on_batch): the quadratic model needs the batch."
        )
    config = kfac.config
    indices = kfac.variable_indices(variables)
    kept = [i for i in range(len(variables)) if directions[i] is not None]
    decay = kfac.weight_decay_coeff if config.coupled_weight_decay else None
    qmodel = adaptive.qmodel_coefficients(
        inputs.model,
        inputs.x,
        inputs.start_state,
        inputs.sample_weights,
        inputs.batch_size,
        inputs.loss,
        kfac.output_losses(len(keras.tree.flatten(inputs.y_pred))),
        variables=[variables[i] for i in kept],
        gradients=[grads[i] for i in kept],
        directions=[directions[i] for i in kept],
        velocities=[tf.convert_to_tensor(kfac.state.velocities[indices[i]]) for i in kept],
        inner=inner,
        damping=kfac.damping,
        weight_decay=decay,
        fixed_momentum=kfac.momentum if config.momentum_type == adaptive.QMODEL_FIXED_MU else None,
        include_damping=config.include_damping_in_quad_change,
        context=kfac.context,
    )
    state = kfac.state.qmodel_state
    state.assign(tf.stack([qmodel.alpha, qmodel.mu, qmodel.change, state[3]]))
    return qmodel.alpha, qmodel.mu, qmodel.loss_before


def _adapt_damping(
    kfac: Kfac, model: keras.Model, loss_after: tf.Tensor, loss_before: tf.Tensor | None
) -> None:
    """Levenberg–Marquardt on ρ = (L(θ+v) − L(θ)) / q(v), with this replica's `loss_after`.

    One small all-reduce averages `loss_after` (the compiled loss, Keras'
    per-replica scaling undone, as the loss before). A NaN ρ (a non-finite
    loss) raises the damping.
    """
    state = kfac.state.qmodel_state
    config = kfac.config
    decay = kfac.weight_decay_coeff if config.coupled_weight_decay else None
    rho = adaptive.reduction_ratio(
        loss_after,
        loss_before,
        state[2],
        variables=model.trainable_variables,
        weight_decay=decay,
        context=kfac.context,
    )
    damping = adaptive.adapt_damping(
        tf.convert_to_tensor(kfac.damping),
        tf.cast(rho, kfac.damping.dtype),
        interval=config.damping_adaptation_interval,
        decay=config.damping_adaptation_decay,
        min_damping=config.min_damping,
    )
    kfac.damping.assign(damping)
    state.assign(tf.concat([state[:3], [tf.cast(rho, state.dtype)]], 0))


def _accumulated_directions(
    kfac: Kfac,
    grads: Sequence[tf.Tensor],
    variables: Sequence[tf.Variable],
    learning_rate: tf.Tensor,
    inputs: StepInputs | None,
) -> tuple[_Directions, list[tuple[tf.Tensor, keras.Variable]]]:
    """Adds this micro-batch to the sums; on the k-th call, phases 4–8 on their means.

    Also returns each gradient accumulator's next value (zero after an
    update), for the update's `merge_call` to write (see accumulation.py).
    """
    steps = kfac.config.gradient_accumulation_steps
    accumulators = kfac.gradient_accumulators(variables)
    sums = [tf.convert_to_tensor(a) + g for a, g in zip(accumulators, grads)]
    statistics, is_statistics_step, is_inverse_step = _curvature_schedule(kfac, inputs)
    statistic_sums = kfac.state.statistic_sums
    assert statistic_sums is not None  # made by `build` with gradient accumulation
    statistics = statistic_sums.add(statistics)
    is_update_step = tf.equal((kfac._iterations + 1) % steps, 0)  # noqa: SLF001
    position = {index: i for i, index in enumerate(kfac.variable_indices(variables))}
    registered = [
        position[i] for indices in kfac.state.block_indices for i in indices if i in position
    ]

    def apply() -> tuple:
        means = [total / tf.cast(steps, total.dtype) for total in sums]
        result = _directions(
            kfac,
            means,
            variables,
            learning_rate,
            inputs,
            (statistics, is_statistics_step, is_inverse_step),
            conditional=True,
        )
        statistic_sums.reset()
        return (
            result.directions,
            result.scale,
            result.momentum,
            result.finite,
            result.curvature_gradients,
        )

    def accumulate() -> tuple:
        zero = tf.constant(0.0, curvature_dtype())
        no_curvature = [tf.zeros_like(grads[i]) for i in registered] if kfac.config.clips_kl else []
        return [tf.zeros_like(g) for g in grads], zero, zero, tf.constant(False), no_curvature

    directions, scale, momentum, finite, curvature_gradients = tf.cond(
        is_update_step, apply, accumulate
    )
    next_sums = [tf.where(is_update_step, tf.zeros_like(t), t) for t in sums]
    result = _Directions(directions, scale, momentum, finite, curvature_gradients)
    return result, list(zip(next_sums, accumulators))
