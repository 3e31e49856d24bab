"""Make `fit` and `evaluate` of one Keras model work under MultiWorkerMirroredStrategy.

Keras 3.15's TensorFlow trainer fails there in two places (keras-team/keras#20585):

1. `_maybe_symbolic_build` reduces the first per-replica data batch with
   `strategy.reduce("MEAN", ..., axis=None)` ("Attempt to convert a value
   (PerReplica...)"). The build needs only shapes and dtypes: this replica's
   batch serves.
2. `reduce_per_replica` reduces every log with `strategy.reduce("MEAN", v,
   axis=0)` under multi-worker, which fails for the scalar logs of a train or
   test step ("Invalid reduction dimension 0"). The fix hands each scalar log to
   it with shape `[1]`: the mean over replicas and axis 0 of one-element
   vectors is the mean over replicas, as a scalar again.

A third failure is not fixed: with `steps_per_execution` > 1 the step runs in
a `tf.while_loop`, and the strategy's own all-reduce takes its instance key
through a call-time placeholder that TensorFlow does not feed inside the loop
("You must feed a value for placeholder tensor 'while/.../Placeholder'"), even
for Adam. Keys fixed at trace time would make a worker that retraces alone
hang instead, so the fix rejects that case up front (`check_steps_per_execution`).

Both are fixed on one model instance with instance-level overrides of
`_maybe_symbolic_build` and `_make_function`; Keras itself is never patched.
`_make_function` receives the step (`self.train_step`, `self.test_step`) when
the train or test function is made, so a `train_step` assigned to the instance
(as the K-FAC optimizer does) keeps the fix. `predict` works unfixed.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf

from kfac_dist.heartbeat import heartbeat

VERIFIED_KERAS = "3.15"
_FIX_ATTRIBUTES = ("_maybe_symbolic_build", "_make_function")


def _check_keras_version(version: str) -> None:
    if version.split(".")[:2] != VERIFIED_KERAS.split("."):
        raise RuntimeError(
            f"The multi-worker fit fix overrides Keras trainer internals and was "
            f"verified on Keras {VERIFIED_KERAS}.x only (>=3.15,<3.16); found "
            f"Keras {version}."
        )


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return (
        isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        and strategy.extended._in_multi_worker_mode()
    )


def check_steps_per_execution(model: keras.Model, steps_per_execution: int | None = None) -> None:
    """Raises a clear `ValueError` for steps_per_execution > 1 across several workers.

    `steps_per_execution` defaults to the model's (1 before `compile`).
    """
    if steps_per_execution is None:
        steps_per_execution = int(getattr(model, "steps_per_execution", 1) or 1)
    if steps_per_execution > 1 and _is_multi_worker(model.distribute_strategy):
        raise ValueError(
            f"steps_per_execution={steps_per_execution} does not work under "
            "MultiWorkerMirroredStrategy with several workers in Keras 3.15, even with "
            "Adam: the step then runs inside a tf.while_loop, where TensorFlow does not "
            "feed the instance keys of the strategy's all-reduce (a 'You must feed a "
            "value for placeholder tensor' error). Compile with steps_per_execution=1 "
            "(the default) for multi-worker training."
        )


def is_multi_worker_fit_enabled(model: keras.Model) -> bool:
    """Whether `enable_multi_worker_fit` installed its fix on `model`."""
    return all(name in vars(model) for name in _FIX_ATTRIBUTES)


def enable_multi_worker_fit(model: keras.Model) -> keras.Model:
    """Makes `model.fit` and `model.evaluate` work under multi-worker training.

    Call it after building the model inside `strategy.scope()`, before `fit`.
    It changes nothing unless the model's strategy is a
    `MultiWorkerMirroredStrategy` with more than one worker; calling it again
    does nothing. Raises `RuntimeError` where the fix is needed and Keras is
    not 3.15.x, the version whose internals it was verified on, and
    `ValueError` for `steps_per_execution` > 1 (now if the model is compiled
    so, else when `fit` makes its train function).

    Returns:
        `model`, for chaining.
    """
    if is_multi_worker_fit_enabled(model) or not _is_multi_worker(model.distribute_strategy):
        return model
    _check_keras_version(keras.version())
    check_steps_per_execution(model)
    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)
    model._make_function = types.MethodType(_make_function, model)
    # Functions made before the fix would reduce the logs the failing way.
    model.train_function = model.test_function = None
    return model


def _maybe_symbolic_build(model: keras.Model, iterator: Any = None, data_batch: Any = None) -> None:
    """Keras' build, fed this replica's share of the first batch."""
    if iterator is not None:
        strategy = model.distribute_strategy
        for _, _, distributed_iterator in iterator:
            data_batch = tf.nest.map_structure(
                lambda value: strategy.experimental_local_results(value)[0],
                next(distributed_iterator),
            )
            break
    type(model)._maybe_symbolic_build(model, data_batch=data_batch)


def _make_function(model: keras.Model, step_function: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Keras' train/test function around a step whose scalar logs have shape [1]."""
    check_steps_per_execution(model)

    @functools.wraps(step_function)
    def step_with_vector_logs(data: Any) -> Any:
        return tf.nest.map_structure(_as_vector_if_scalar, step_function(data))

    return type(model)._make_function(model, step_with_vector_logs)


def _as_vector_if_scalar(value: Any) -> Any:
    if isinstance(value, tf.Tensor | tf.Variable) and value.shape.rank == 0:
        return tf.reshape(value, [1])
    return value


class Heartbeat(keras.callbacks.Callback):
    """Tells the launcher (`kfac_dist.jobs.launch`) after every batch that this worker progresses.

    The launcher stops a job whose worker neither prints nor beats for its
    `--stall-timeout`; a quiet run (`verbose=0`, one long epoch) beats here.
    Outside a launched job it does nothing.
    """

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        heartbeat()

    def on_test_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        heartbeat()

    def on_predict_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        heartbeat()
