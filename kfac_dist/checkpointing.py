"""Checkpoints every K steps that restore the whole training state, K-FAC's included.

Keras 3.15's `BackupAndRestore` restores only at epoch boundaries and lets
every worker write the same directory. This builds on `tf.train.Checkpoint`
and `CheckpointManager` instead: the model, the optimizer (factors — synced
first, so replica 0's copy is every replica's —, inverses, damping, counters,
momentum) and its step, which is also the sampled Fisher's RNG state and the
position in a deterministic data order. Under MultiWorkerMirroredStrategy the
chief writes the checkpoint and the other workers write to temporary
directories, as tf.distribute recommends.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import tensorflow as tf


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

    Usage (the same command on a first start and after a failure):

        checkpoint = StepCheckpoint(model, directory, every_steps=100)
        step = checkpoint.restore()          # 0 on a first start
        dataset = deterministic_batches.skip(step)
        model.fit(dataset, steps_per_epoch=total_steps - step, callbacks=[checkpoint])
    """

    def __init__(
        self, model: keras.Model, directory: str | Path, every_steps: int, max_to_keep: int = 2
    ):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}.")
        self.every_steps = int(every_steps)
        self.directory = Path(directory)
        self._model = model
        strategy = model.distribute_strategy
        self.is_chief, index = _worker(strategy)
        self._write_dir = (
            self.directory if self.is_chief else self.directory / f".worker-{index}-tmp"
        )
        self._checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
        self._manager = tf.train.CheckpointManager(
            self._checkpoint, str(self._write_dir), max_to_keep=max_to_keep
        )

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

    def on_train_batch_end(self, batch, logs=None):
        step = int(self._model.optimizer.iterations.numpy())
        if step % self.every_steps == 0:
            self.save()

    def save(self) -> None:
        """Every worker calls this at the same step (the factor sync is a collective)."""
        sync = getattr(self._model.optimizer, "sync_factors", None)
        if sync is not None:
            sync()
        self._manager.save(checkpoint_number=int(self._model.optimizer.iterations.numpy()))
        if not self.is_chief:
            shutil.rmtree(self._write_dir, ignore_errors=True)
