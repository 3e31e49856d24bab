"""How `Kfac` hooks into its model: the train step, the train function's logs, train_on_batch.

The step itself is `step.kfac_train_step`. K-FAC's own state (damping, KL
clip, skips, the quadratic model) reaches the logs from the host after each
train function call, not from the step: Keras would average each returned
log across replicas, a collective per value and step.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras

from kfac_dist import loss_scaling
from kfac_dist.step import kfac_of, kfac_train_step

if TYPE_CHECKING:
    from kfac_dist.optimizer import Kfac


def _bound_kfac(model: keras.Model) -> Kfac | None:
    kfac = kfac_of(loss_scaling.inner_optimizer(model.optimizer))
    if kfac is not None and kfac.model is model and kfac.built:
        return kfac
    return None


def _with_kfac_logs(model: keras.Model, function: Callable[[Any], dict]) -> Callable[[Any], dict]:
    """Keras' train function, its logs joined by K-FAC's state read on the host."""

    def train_function(iterator: Any) -> dict:
        logs = function(iterator)
        kfac = _bound_kfac(model)
        return logs if kfac is None else {**logs, **kfac.step_logs()}

    # What the traced-graph tests inspect, and the mark of a function already wrapped.
    setattr(train_function, "__wrapped__", function)  # noqa: B010
    return train_function


def _make_train_function(model: keras.Model, force: bool = False) -> Callable[[Any], dict]:
    type(model).make_train_function(model, force)
    function = model.train_function
    if function is not None and not hasattr(function, "__wrapped__"):
        model.train_function = _with_kfac_logs(model, function)
    return model.train_function


def _train_on_batch(
    model: keras.Model,
    x: Any,
    y: Any = None,
    sample_weight: Any = None,
    class_weight: Any = None,
    return_dict: bool = False,
) -> Any:
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
