"""The K-FAC train step that `Kfac` installs on the model it is bound to.

One step (DESIGN.md §3): a forward pass that records each block's inputs and
pre-activations; the compiled loss and its gradients; on factor-update steps,
gradients of a pseudo-loss built from the model's predictive distribution at
every recorded pre-activation, and each block's batch statistics; then
`apply_gradients`, where the optimizer all-reduces the gradients once (with
each replica's finiteness of its statistics), folds the statistics unless
some replica saw a non-finite value, and on inverse-update steps syncs,
inverts its own factors and shares them, before it preconditions. Under
mixed_float16 the step also does the loss scaling of the `LossScaleOptimizer`
wrapping Kfac, on that same decision (see `loss_scaling`). Returns Keras'
metrics; K-FAC's own state joins them on the host."""

from __future__ import annotations

import types
from collections.abc import Callable

import keras
import tensorflow as tf
from keras.src.losses import loss as keras_loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from kfac_dist import adaptive, capture, loss_scaling, registration
from kfac_dist.adaptive import REGULAR
from kfac_dist.linalg import curvature_dtype
from kfac_dist.losses import EXACT


def _flatten(structure):
    return keras.tree.flatten(structure)


def _align_targets(y_true, y_pred, output_names):
    """y_true as a flat list matching the flat model outputs."""
    flat_pred = _flatten(y_pred)
    if len(flat_pred) == 1:
        flat_true = _flatten(y_true) if isinstance(y_true, (list, tuple, dict)) else [y_true]
        return flat_true[:1]
    if isinstance(y_true, dict) and not isinstance(y_pred, dict):
        return [y_true.get(name) for name in output_names]
    return _flatten(y_true)


def _align_weights(sample_weight, count: int, output_names):
    if sample_weight is None or not isinstance(sample_weight, (list, tuple, dict)):
        return [sample_weight] * count
    if isinstance(sample_weight, dict):
        return [sample_weight.get(name) for name in output_names]
    return list(sample_weight)


def input_factor_weights(effective_weights, output_losses, sample_weight):
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


def example_weight_total(weights, batch_size) -> tf.Tensor | None:
    """Σ_i (mean weight of example i): what the input factors are normalised by."""
    if weights is None:
        return None
    w = tf.cast(weights, curvature_dtype())
    # Not [b, -1]: a replica with no examples cannot infer the -1.
    per_example = tf.size(w) // tf.maximum(batch_size, 1)
    return tf.reduce_sum(tf.reduce_mean(tf.reshape(w, tf.stack([batch_size, per_example])), axis=1))


def pseudo_losses(kfac, y_pred, y_true, sample_weight, seed, replica_id):
    """Σ⟨u, η⟩ over outputs (one per output column in exact mode, else one), and
    each output's effective weights (sample weights with its Keras mask applied).

    Each example's vectors carry an independent random sign: Kronecker and
    per-example statistics are unchanged by it, and it makes the diagonal
    estimate of generic blocks unbiased (see blocks/diagonal.py).
    """
    model = kfac.model
    flat_pred = _flatten(y_pred)
    output_names = list(getattr(model, "output_names", None) or [])
    flat_true = _align_targets(y_true, y_pred, output_names)
    flat_weights = _align_weights(sample_weight, len(flat_pred), output_names)
    output_losses = kfac.output_losses(len(flat_pred))
    seed = tf.random.experimental.stateless_fold_in(seed, replica_id)
    batch = tf.shape(flat_pred[0])[0]
    signs = (
        2.0
        * tf.cast(
            tf.random.stateless_uniform([batch], tf.random.experimental.stateless_fold_in(seed, -1))
            < 0.5,
            curvature_dtype(),
        )
        - 1.0
    )
    columns, effective = [], []
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
        vectors = loss.vectors(eta, true, weight, kfac.estimation_mode, output_seed)
        columns.extend(tf.reduce_sum(sign * u * eta) for u in vectors)
    if kfac.estimation_mode != EXACT:
        columns = [tf.add_n(columns)]
    return columns, effective


def kfac_train_step(model, data):
    """Keras `train_step` with K-FAC's curvature work (installed per instance).

    Also the hook for a model whose class has its own `train_step`: decorated
    with `calls_kfac_step`, that step calls `kfac_train_step(self, data)` for
    the forward pass, the curvature and the update, and does its own work
    around it (see `install`).
    """
    # Kfac, a MultiOptimizer holding it, or the LossScaleOptimizer mixed_float16 wraps it in.
    optimizer = model.optimizer
    kfac = kfac_of(loss_scaling.inner_optimizer(optimizer))
    if kfac is None or kfac.model is not model:
        # Keras' own step: `type(model).train_step` may be a user step that
        # called this hook.
        return keras.Model.train_step(model, data)
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    if not optimizer.built:
        # A model that builds late (subclassed, Sequential without an Input,
        # model.build(shape)) has no variables yet: create them first, so
        # that registration sees its layers. A MultiOptimizer (first built
        # here without a strategy) gives K-FAC its share.
        registration.build_from_batch(model, x)
        optimizer.build(model.trainable_variables)
    curvature = kfac.curvature
    batch_size = tf.shape(next(t for t in _flatten(x) if t is not None))[0]
    kfac.check_batch_size(batch_size)
    # This update's index, read before the update (with gradient accumulation,
    # all k micro-batches of an update share it).
    step = tf.identity(kfac.iterations)
    replica_id = curvature.context.replica_id()
    # Each call (micro-batch) draws its own samples.
    calls = kfac._iterations  # noqa: SLF001
    seed = tf.stack([tf.cast(kfac.seed, tf.int64), tf.cast(calls, tf.int64)])
    # Under mixed_float16 the loss is scaled, the pseudo-loss is not (see loss_scaling).
    scale = loss_scaling.loss_scale(optimizer)
    if scale is not None:
        _check_loss_scaling(optimizer, kfac)

    # The adaptive mode's extra forward passes start from this state, so that
    # they draw the random numbers (dropout masks) this step's loss was taken with.
    start_state = adaptive.model_state(model) if kfac.momentum_type != REGULAR else None
    with tf.GradientTape(persistent=True) as tape:
        with capture.recording(curvature.blocks) as records:
            y_pred = model(x, training=True) if model._call_has_training_arg else model(x)  # noqa: SLF001
        loss = model._compute_loss(  # noqa: SLF001
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
        )
        model._loss_tracker.update_state(  # noqa: SLF001
            keras_loss_module.unscale_loss_for_distribution(loss),
            sample_weight=batch_size,
        )
        loss_value = loss
        if scale is not None:
            loss = loss * tf.cast(scale, loss.dtype)
        pseudo, effective_weights = pseudo_losses(kfac, y_pred, y, sample_weight, seed, replica_id)

    trainable_weights = model.trainable_weights
    gradients = tape.gradient(loss, trainable_weights)
    if scale is not None:
        gradients = [None if g is None else g / tf.cast(scale, g.dtype) for g in gradients]

    def update_statistics():
        # Gradients are taken at each layer block's recorded pre-activations,
        # or at the variables of a generic block.
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
        weights = input_factor_weights(
            effective_weights, kfac.output_losses(len(_flatten(y_pred))), sample_weight
        )
        statistics = []
        for block, block_records, block_targets in zip(curvature.blocks, records, targets):
            output_grads = [next(stacked) for _ in block_targets]
            statistics.extend(block.statistics(block_records, output_grads, batch_size, weights))
        total = example_weight_total(weights, batch_size)
        return curvature.batch_statistics(statistics, batch_size, total)

    # The statistics are folded (and the inverses updated) by the optimizer,
    # after the gradient all-reduce that also decides, on values every
    # replica shares, whether this batch was finite everywhere.
    if kfac.cov_update_every == 1:
        statistics, is_statistics_step = update_statistics(), tf.constant(True)
    else:
        is_statistics_step = tf.equal(step % kfac.cov_update_every, 0)
        statistics = tf.cond(is_statistics_step, update_statistics, curvature.empty_statistics)
    kfac._replica_step.curvature = (statistics, is_statistics_step, step)  # noqa: SLF001
    kfac._replica_step.inputs = {  # noqa: SLF001
        "x": x,
        "y_pred": y_pred,
        "sample_weights": effective_weights,
        "state": start_state,
        "batch_size": batch_size,
        # A sum over a vector of losses (reduction=None), as Keras' gradient is.
        "loss": tf.reduce_sum(keras_loss_module.unscale_loss_for_distribution(loss_value)),
    }
    kfac._replica_step.loss_scaled = scale is not None  # noqa: SLF001
    if scale is None:
        # A MultiOptimizer hands K-FAC its share of the gradients.
        optimizer.apply_gradients(zip(gradients, trainable_weights))
    else:
        # The wrapper's own apply would decide on this replica's gradients alone.
        kfac.apply_gradients(zip(gradients, trainable_weights))
        loss_scaling.finish_step(optimizer, kfac.step_was_finite())
    if kfac.adapt_damping:
        adapt_now = tf.equal((step + 1) % kfac.damping_adaptation_interval, 0)
        if scale is not None:
            # A step the loss scale rejects changed nothing, nor does it change the damping.
            adapt_now = tf.logical_and(adapt_now, kfac.step_was_finite())
        tf.cond(
            adapt_now,
            lambda: _adapt_damping(model, kfac, x, y, sample_weight, start_state),
            tf.no_op,
        )
    # K-FAC's own state joins the logs on the host (see `_with_kfac_logs`).
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def compiled_loss(model, x, y, sample_weight, start_state=None) -> tf.Tensor:
    """The compiled loss of the current weights on (x, y), as a measurement.

    The same quantity as the loss the step logs: Keras' per-output losses and
    regularisation losses, with Keras' per-replica scaling undone, in the
    loss's own dtype. The forward pass starts from `start_state` (the step's
    random draws) and leaves no trace: no metric update, no moved
    BatchNormalization moments, no advanced seed.
    """
    with adaptive.measurement(model, start_state):
        y_pred = model(x, training=True)
        regularisation = [
            model._aggregate_additional_loss(loss)  # noqa: SLF001
            for loss in model.losses
        ]
    flat_pred = _flatten(y_pred)
    output_names = list(getattr(model, "output_names", None) or [])
    flat_true = _align_targets(y, y_pred, output_names)
    flat_weights = _align_weights(sample_weight, len(flat_pred), output_names)
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


def _adapt_damping(model, kfac, x, y, sample_weight, start_state):
    kfac.adapt_damping_after_step(compiled_loss(model, x, y, sample_weight, start_state))
    return tf.no_op()


def kfac_of(optimizer):
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


def _check_loss_scaling(optimizer, kfac) -> None:
    """mixed_float16's loss scaling with what it is not built for: a clear error."""
    if not getattr(loss_scaling.inner_optimizer(optimizer), "is_kfac", False):
        raise ValueError(
            "mixed_float16 wrapped a MultiOptimizer holding Kfac in a LossScaleOptimizer: "
            "K-FAC's loss scaling covers a Kfac that trains the whole model only. Use the "
            "mixed_bfloat16 policy (no loss scaling), or let Kfac train every layer."
        )
    if kfac.gradient_accumulation_steps:
        raise ValueError(
            "mixed_float16 with Kfac(gradient_accumulation_steps=...) is not supported: a "
            "rejected micro-batch would have to discard the whole accumulated update. Use "
            "the mixed_bfloat16 policy (no loss scaling), or a larger batch per step."
        )


def _bound_kfac(model: keras.Model):
    kfac = kfac_of(loss_scaling.inner_optimizer(model.optimizer))
    if kfac is not None and kfac.model is model and kfac.built:
        return kfac
    return None


def _with_kfac_logs(model: keras.Model, function):
    """Keras' train function, its logs joined by K-FAC's state read on the host."""

    def train_function(iterator):
        logs = function(iterator)
        kfac = _bound_kfac(model)
        return logs if kfac is None else {**logs, **kfac.step_logs()}

    train_function.__wrapped__ = function
    return train_function


def _make_train_function(model: keras.Model, force: bool = False):
    type(model).make_train_function(model, force)
    function = model.train_function
    if function is not None and not hasattr(function, "__wrapped__"):
        model.train_function = _with_kfac_logs(model, function)
    return model.train_function


def _train_on_batch(
    model: keras.Model, x, y=None, sample_weight=None, class_weight=None, return_dict=False
):
    """Keras' `train_on_batch`: K-FAC's state only in the dict, so that the
    default return is what it is with any Keras optimizer (a scalar loss when
    there are no metrics)."""
    logs = type(model).train_on_batch(
        model, x, y, sample_weight=sample_weight, class_weight=class_weight, return_dict=True
    )
    if return_dict:
        return logs
    kfac = _bound_kfac(model)
    kfac_keys = set(kfac.step_logs()) if kfac is not None else set()
    return model._flatten_metrics_in_order(  # noqa: SLF001
        {key: value for key, value in logs.items() if key not in kfac_keys}
    )


_CALLS_KFAC_STEP = "_calls_kfac_step"


def calls_kfac_step(train_step: Callable) -> Callable:
    """Marks a custom `train_step` that runs K-FAC's step itself.

    Example:
        class MyModel(keras.Model):
            @kfac_dist.calls_kfac_step
            def train_step(self, data):
                x, y = data
                logs = kfac_dist.kfac_train_step(self, (augment(x), y))
                return {**logs, "my_metric": ...}

    `Kfac(model=...)` then leaves that step in place instead of refusing it.
    """
    setattr(train_step, _CALLS_KFAC_STEP, True)
    return train_step


def _user_train_step(model: keras.Model) -> Callable | None:
    """The model's own `train_step` (its instance's or its class's), if not Keras'."""
    own = vars(model).get("train_step")
    if own is not None and getattr(own, "__func__", None) is not kfac_train_step:
        return own
    if type(model).train_step is not keras.Model.train_step:
        return type(model).train_step
    return None


def install(model: keras.Model) -> None:
    """Makes `model` run the K-FAC train step (on this instance only).

    K-FAC needs its own step: the forward pass records every layer's inputs
    and pre-activations, and the curvature gradients come from the same tape.
    A model's own `train_step` is never replaced silently: it must call
    K-FAC's step (`calls_kfac_step`), or binding fails saying what to do.
    K-FAC's state reaches the logs from the host after each train function
    call, not from the step: Keras would average each returned log across
    replicas, a collective per value and step.
    """
    user_step = _user_train_step(model)
    if user_step is not None:
        if not getattr(user_step, _CALLS_KFAC_STEP, False):
            raise ValueError(
                f"Model '{model.name}' ({type(model).__name__}) has its own train_step, "
                "which Kfac would have to replace: K-FAC's step records each layer's "
                "inputs and pre-activations in the forward pass and takes the curvature "
                "gradients from the same tape. Either remove the override (a custom "
                "loss belongs in compute_loss, metrics in compile), or keep it and call "
                "K-FAC's step from it: decorate it with @kfac_dist.calls_kfac_step and "
                "return kfac_dist.kfac_train_step(self, data) (on data you may have "
                "transformed, with logs you may extend)."
            )
    else:
        model.train_step = types.MethodType(kfac_train_step, model)
    model.make_train_function = types.MethodType(_make_train_function, model)
    model.train_on_batch = types.MethodType(_train_on_batch, model)
    model.train_function = None
