"""Checkpoints every K steps that restore the whole training state, K-FAC's included.

Keras 3.15's `BackupAndRestore` restores only at epoch boundaries and lets
every worker write the same directory. This builds on `tf.train.Checkpoint`
and `CheckpointManager` instead: the model, the optimizer (factors — synced
first, so replica 0's copy is every replica's —, inverses, damping, counters,
the sampling seed, momentum) and its step, which is also the sampled Fisher's
RNG state and the position in a deterministic data order. Under
MultiWorkerMirroredStrategy every worker writes (tf.distribute requires it)
but only the chief writes to the checkpoint directory; the others write to
local temporary storage, removed at once, so a shared file system sees one
copy per save.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from kfac_dist import loss_scaling


def _worker(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    index = int(resolver.task_id or 0)
    is_chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker"
        and index == 0
        and "chief" not in resolver.cluster_spec().jobs
    )
    return is_chief, index


class StepCheckpoint(keras.callbacks.Callback):
    """Saves every `every_steps` steps; `restore()` resumes from the latest save.

    With `steps_per_execution` > 1 callbacks run only between executions: the
    save for each multiple of `every_steps` happens at the first execution
    boundary at or after it, and the message (on the chief, with `verbose`)
    names the step saved.

    Usage (the same command on a first start and after a failure):

        checkpoint = StepCheckpoint(model, directory, every_steps=100)
        step = checkpoint.restore()          # 0 on a first start
        dataset = deterministic_batches.skip(step)
        model.fit(dataset, steps_per_epoch=total_steps - step, callbacks=[checkpoint])
    """

    def __init__(
        self,
        model: keras.Model,
        directory: str | Path,
        every_steps: int,
        max_to_keep: int = 2,
        verbose: int = 1,
    ) -> None:
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}.")
        self.every_steps = int(every_steps)
        self.directory = Path(directory)
        self.verbose = verbose
        self._model = model
        self.is_chief, _ = _worker(model.distribute_strategy)
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self._manager = (
            tf.train.CheckpointManager(
                self._checkpoint, str(self.directory), max_to_keep=max_to_keep
            )
            if self.is_chief
            else None
        )
        #: where this worker wrote its last save (a removed temporary path off the chief).
        self.last_write_path: str | None = None
        self._saved_multiple = 0

    def restore(self) -> int:
        """Restores the latest checkpoint, if any; returns the step to resume from."""
        latest = tf.train.latest_checkpoint(str(self.directory))
        if latest is None:
            return 0
        optimizer = self._model.optimizer
        if not optimizer.built:
            with self._model.distribute_strategy.scope():
                optimizer.build(self._model.trainable_variables)
        self._checkpoint.restore(latest).assert_existing_objects_matched()
        return int(optimizer.iterations.numpy())

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._saved_multiple = int(self._model.optimizer.iterations.numpy()) // self.every_steps

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = int(self._model.optimizer.iterations.numpy())
        if step // self.every_steps > self._saved_multiple:
            self.save()
            if self.verbose and self.is_chief:
                due = step // self.every_steps * self.every_steps
                print(
                    f"StepCheckpoint: saved step {step} (due at step {due}: the first "
                    "execution boundary at or after it)",
                    flush=True,
                )

    def save(self) -> None:
        """Every worker calls this at the same step (the factor sync is a collective)."""
        kfac = loss_scaling.inner_optimizer(self._model.optimizer)
        sync = getattr(kfac, "sync_factors", None)
        if sync is not None:
            sync()
        step = int(self._model.optimizer.iterations.numpy())
        self._saved_multiple = step // self.every_steps
        if self._manager is not None:
            self.last_write_path = self._manager.save(checkpoint_number=step)
            return
        local = tempfile.mkdtemp(prefix="kfac-step-checkpoint-")
        try:
            self.last_write_path = self._checkpoint.write(str(Path(local) / f"ckpt-{step}"))
        finally:
            shutil.rmtree(local, ignore_errors=True)
