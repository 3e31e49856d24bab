"""The run of the training command (kfac_dist/jobs/train.py parses its flags first).

One command for a laptop (`--strategy default`), the GPUs (or CPUs) of one
machine (`mirrored`), a worker of a cluster (`multiworker`: its peers come
from `TF_CONFIG` as Kubernetes and other systems set it, or from SLURM with
`--cluster slurm`) and a TPU (`tpu`: connected by kfac_dist/jobs/tpu.py). The data
is one `tf.data` pipeline of global batches; under multiworker each worker
keeps its slice of every batch (DATA auto-sharding). With `--checkpoint-every
K` the whole training state is saved every K steps and the same command,
restarted after a failure, resumes from the latest save: the data order is a
function of the seed and the step, so the resumed run follows the
uninterrupted one. docs/launching.md says how to launch it everywhere.

This module imports TensorFlow and Keras; `kfac_dist.jobs.train` loads it
only once the flags are parsed, and forwards its names.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import kfac_dist
from kfac_dist.checkpointing import StepCheckpoint
from kfac_dist.jobs import benchmarks, shutdown, tpu
from kfac_dist.jobs.examples import autoencoder, convnet
from kfac_dist.jobs.examples import data as data_lib
from kfac_dist.jobs.train_flags import (
    CHECKPOINT_NAME,
    EXIT_FAILURE,
    KFAC_DEFAULTS,
    KFAC_FLAGS,
    SLURM_PORT_BASE,
    STEP_CHECKPOINTS,
    TPU_LOCAL,
    TPU_STEPS_PER_EXECUTION,
    TPU_TIMEOUT_S,
)
from kfac_dist.multi_worker import Heartbeat

CROSS_DEVICE_OPS = {
    "reduce_to_one": tf.distribute.ReductionToOneDevice,
    "nccl": tf.distribute.NcclAllReduce,
    "hierarchical_copy": tf.distribute.HierarchicalCopyAllReduce,
}


class SetupError(RuntimeError):
    """A problem with the command line, the data or the cluster: one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class Example:
    """A model builder, its loss, and how its inputs and targets come from MNIST."""

    build: Callable[..., keras.Model]
    loss: Callable[[], keras.losses.Loss]
    loss_weights: float | None
    flatten: bool  # (n, 784) images rather than (n, 28, 28, 1)
    reconstruct: bool  # the target is the image itself, not its label


EXAMPLES = {
    "autoencoder": Example(
        autoencoder.build_autoencoder,
        autoencoder.autoencoder_loss,
        autoencoder.LOSS_WEIGHT,
        flatten=True,
        reconstruct=True,
    ),
    "convnet": Example(
        convnet.build_convnet, convnet.convnet_loss, None, flatten=False, reconstruct=False
    ),
}


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What one worker reports: `--json-out` writes it."""

    history: dict[str, list[float]]
    weights_sha256: str  # equal on every worker when they trained in sync
    num_replicas: int
    task_type: str  # this process' task in the cluster: "worker" (or "chief")
    task_id: int
    is_chief: bool
    checkpoint: str | None
    seconds: float
    start_step: int = 0  # the step this run resumed from (0: a fresh start)
    # Each step's own loss (not Keras' running mean) and the seconds since
    # `fit` began when it ended: {"step": [...], "loss": [...], "seconds": [...]}.
    step_log: dict[str, list[float]] = dataclasses.field(default_factory=dict)


# --- the strategy ------------------------------------------------------------------
def make_strategy(args: argparse.Namespace) -> tf.distribute.Strategy:
    """The strategy `args.strategy` names, with its flags."""
    if args.strategy == "default":
        return tf.distribute.get_strategy()
    if args.strategy == "mirrored":
        devices = args.devices.split(",") if args.devices else None
        return mirrored_strategy(devices, args.cross_device_ops or "auto")
    if args.strategy == "multiworker":
        cluster = args.cluster or "tf_config"
        if cluster == "slurm":
            resolver = slurm_cluster_resolver(
                args.slurm_port_base or SLURM_PORT_BASE, args.slurm_gpus_per_task
            )
        else:
            if "TF_CONFIG" not in os.environ:
                print("TF_CONFIG is not set: training as a single worker.", flush=True)
            resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        shutdown.configure_shutdown_barrier(resolver)  # see main(): the workers leave together
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    return tpu.connect(
        args.tpu or TPU_LOCAL,
        zone=args.zone,
        project=args.project,
        timeout_s=args.tpu_timeout or TPU_TIMEOUT_S,
    )


def mirrored_strategy(
    devices: Sequence[str] | None = None, cross_device_ops: str = "auto"
) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy over `devices` (default: every GPU, else every logical CPU).

    On CPUs, "auto" all-reduces by reduction to one device: the collective
    all-reduce TensorFlow would use keeps per-process state (one group key for
    any device set), so a second MirroredStrategy in the same process, as in
    tests, would clash with the first.
    """
    if not devices:
        found = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        devices = [device.name for device in found]
    on_cpus = all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices)
    if cross_device_ops == "auto":
        ops = tf.distribute.ReductionToOneDevice() if on_cpus else None
    else:
        ops = CROSS_DEVICE_OPS[cross_device_ops]()
    return tf.distribute.MirroredStrategy(list(devices), cross_device_ops=ops)


def slurm_cluster_resolver(
    port_base: int = SLURM_PORT_BASE, gpus_per_task: int | None = None
) -> tf.distribute.cluster_resolver.ClusterResolver:
    """The workers of this SLURM job step (`srun`), one per task, from SlurmClusterResolver.

    TensorFlow's SlurmClusterResolver reads the step's hosts, tasks per host
    and this task's rank, and gives the tasks of a host consecutive ports from
    `port_base`. Its GPU split is left out: it divides each host's GPUs by the
    GPUs per task (which fails with no GPU) and overwrites
    CUDA_VISIBLE_DEVICES, where SLURM (`srun --gpus-per-task`) has already
    given each task its own GPUs. Each task uses the GPUs it sees, or
    `gpus_per_task` of them.
    """
    num_tasks = os.environ.get("SLURM_STEP_NUM_TASKS")
    if num_tasks is None:
        raise SetupError(
            "--cluster slurm needs a SLURM job step: run it with srun "
            "(SLURM_STEP_NUM_TASKS is not set)."
        )
    # One placeholder "GPU" slot per task, so that the resolver's split never
    # drops a task; its num_accelerators is replaced below.
    slots = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=int(num_tasks), gpus_per_task=1, auto_set_gpu=False
    )
    cluster_spec = slots.cluster_spec()
    if gpus_per_task is None:
        gpus_per_task = len(tf.config.list_physical_devices("GPU"))
    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        cluster_spec,
        task_type=slots.task_type,
        task_id=slots.task_id,
        num_accelerators={"GPU": gpus_per_task},
        rpc_layer=slots.rpc_layer,
    )


# --- data and model ------------------------------------------------------------------
def load_data(example: Example, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The example's (inputs, targets) as arrays, kfac_dist.jobs.examples.data.load_mnist."""
    mnist = data_lib.load_mnist(
        flatten=example.flatten, limit=args.limit, source=args.data_source, data_dir=args.data_dir
    )
    return mnist.images, mnist.images if example.reconstruct else mnist.labels


def make_dataset(
    x: np.ndarray,
    y: np.ndarray,
    *,
    global_batch: int,
    seed: int,
    epochs: int | None = None,
    skip: int = 0,
) -> tf.data.Dataset:
    """Global batches in an order that depends on `seed` only, from the `skip`-th on.

    Epoch e is a permutation drawn from (seed, e) by a stateless shuffle, cut
    into full global batches (the remainder is dropped, as Kfac's batch-size
    check and TPUs' static shapes want): batch k is the same in every process.
    So every worker draws the same order, DATA auto-sharding gives each one a
    disjoint slice of every global batch, and a resumed run skips exactly the
    batches it trained on. (tf.data's own `shuffle(seed=...)` reshuffles each
    epoch from a generator that a process' iterators share: a resumed
    multi-worker run got other later epochs.) `epochs=None` repeats forever.
    """
    if len(x) < global_batch:
        raise SetupError(f"{len(x)} examples do not make one batch of --batch-size {global_batch}.")
    first_epoch, skip_in_epoch = divmod(skip, len(x) // global_batch)
    if epochs is None:
        epoch_ids = tf.data.Dataset.counter(first_epoch)
    else:
        epoch_ids = tf.data.Dataset.range(first_epoch, epochs)
    inputs, targets = tf.constant(x), tf.constant(y)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(x)), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(order).batch(global_batch, drop_remainder=True)

    dataset = epoch_ids.flat_map(epoch_batches).skip(skip_in_epoch)
    dataset = dataset.map(
        lambda index: (tf.gather(inputs, index), tf.gather(targets, index)),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def kfac_arguments(args: argparse.Namespace) -> dict:
    """Kfac's keyword arguments: the flags given over KFAC_DEFAULTS."""
    kwargs = dict(KFAC_DEFAULTS)
    given = {flag: getattr(args, flag) for flag in ("learning_rate", *KFAC_FLAGS)}
    kwargs.update({flag: value for flag, value in given.items() if value is not None})
    if kwargs["norm_constraint"] == 0:
        kwargs["norm_constraint"] = None
    return kwargs


def build_model(
    args: argparse.Namespace, strategy: tf.distribute.Strategy, example: Example
) -> keras.Model:
    """The example model with its optimizer, built and compiled inside `strategy.scope()`."""
    steps_per_execution = args.steps_per_execution or (
        TPU_STEPS_PER_EXECUTION if args.strategy == "tpu" else 1
    )
    with strategy.scope():
        model = example.build(seed=args.seed)
        if args.optimizer == "kfac":
            optimizer = kfac_dist.Kfac(
                model=model, batch_size=args.batch_size, seed=args.seed, **kfac_arguments(args)
            )
        else:
            optimizer = keras.optimizers.Adam(args.learning_rate or benchmarks.ADAM_LEARNING_RATE)
        model.compile(
            optimizer=optimizer,
            loss=example.loss(),
            loss_weights=example.loss_weights,
            steps_per_execution=steps_per_execution,
        )
        # Keras builds the optimizer inside the first traced train step when no
        # strategy is set; variables created there make TensorFlow trace it twice.
        optimizer.build(model.trainable_variables)
    # Kfac fixes multi-worker fit on its own model; Adam's model needs the
    # same fix (a no-op unless the strategy spans several workers).
    kfac_dist.enable_multi_worker_fit(model)
    return model


# --- training ------------------------------------------------------------------------
def task(strategy: tf.distribute.Strategy) -> tuple[str, int]:
    """This process' task in its cluster, e.g. ("worker", 1); ("worker", 0) alone."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or resolver.task_type is None:
        return "worker", 0
    return resolver.task_type, int(resolver.task_id)


@contextlib.contextmanager
def worker_dir(directory: Path | None, is_chief: bool) -> Iterator[Path | None]:
    """`directory` on the chief; elsewhere a temporary directory, removed on exit.

    Every worker runs the same callbacks and saves (the factor sync before a
    save is a collective), but only the chief's files are kept, as
    tf.distribute's multi-worker guide recommends.
    """
    if directory is None:
        yield None
    elif is_chief:
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
    else:
        temporary = Path(tempfile.mkdtemp(prefix="kfac-worker-"))
        try:
            yield temporary
        finally:
            shutil.rmtree(temporary, ignore_errors=True)


class StepLog(keras.callbacks.Callback):
    """Each step's own loss and the seconds since `fit` began, for plots against steps and time.

    Keras logs the epoch's running mean of the losses; a step's own loss is
    the difference of two consecutive running sums (every batch has the same
    size), exact to the float32 rounding of the running mean. With
    steps_per_execution > 1 one record covers one execution: the mean loss of
    its steps, at its last step.
    """

    def __init__(self, start_step: int = 0) -> None:
        super().__init__()
        self.start_step = start_step
        self.record: dict[str, list[float]] = {"step": [], "loss": [], "seconds": []}

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()
        self._step = self.start_step

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_steps, self._epoch_sum = 0, 0.0  # Keras' running mean restarts

    def on_train_batch_end(self, batch, logs=None):
        steps = batch + 1  # steps of this epoch so far
        loss_sum = float(logs["loss"]) * steps
        self._step += steps - self._epoch_steps
        self.record["step"].append(self._step)
        self.record["loss"].append((loss_sum - self._epoch_sum) / (steps - self._epoch_steps))
        self.record["seconds"].append(time.perf_counter() - self._start)
        self._epoch_steps, self._epoch_sum = steps, loss_sum


def checkpoint_path(checkpoint_dir: Path) -> Path:
    """Where `--checkpoint-dir` keeps the model (the file a resumed run will read)."""
    return checkpoint_dir / CHECKPOINT_NAME


def weights_sha256(model: keras.Model) -> str:
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def train(
    args: argparse.Namespace, callbacks: Sequence[keras.callbacks.Callback] = ()
) -> TrainResult:
    """Builds, trains (or resumes) and saves as `args` say; returns this worker's result.

    `callbacks` are added to `fit`'s, after the step checkpoint's.
    """
    if args.tensorboard_dir is not None:
        _require_tensorboard()
    strategy = make_strategy(args)
    num_replicas = strategy.num_replicas_in_sync
    if args.batch_size % num_replicas:
        raise SetupError(
            f"--batch-size {args.batch_size} does not split evenly over {num_replicas} replicas."
        )
    example = EXAMPLES[args.example]
    x, y = load_data(example, args)
    keras.utils.set_random_seed(args.seed)
    model = build_model(args, strategy, example)
    is_chief = bool(strategy.extended.should_checkpoint)
    if is_chief and args.verbose:
        # The first step traces and compiles for a while before any progress bar.
        print(
            f"Built the {args.example} model for {args.optimizer} on {num_replicas} "
            f"replica(s) ({args.strategy}); tracing the train step (the first step).",
            flush=True,
        )
    task_type, task_id = task(strategy)
    # Beats for the launcher's stall timeout, whatever the verbosity.
    fit_callbacks: list[keras.callbacks.Callback] = [Heartbeat()]
    start_step = 0
    if args.checkpoint_every is not None:
        # Every worker reads the chief's latest save: a shared file system across hosts.
        step_checkpoint = StepCheckpoint(
            model, args.checkpoint_dir / STEP_CHECKPOINTS, args.checkpoint_every
        )
        start_step = step_checkpoint.restore()
        fit_callbacks.append(step_checkpoint)
        if start_step:
            print(f"Resuming at step {start_step} of {args.steps}.", flush=True)
    dataset = make_dataset(
        x,
        y,
        global_batch=args.batch_size,
        seed=args.seed,
        epochs=None if args.steps else args.epochs or 1,
        skip=start_step,
    )
    if args.steps is None:
        epochs, steps = args.epochs or 1, len(x) // args.batch_size
    else:
        epochs, steps = 1, args.steps - start_step
    step_log = StepLog(start_step)
    history: dict[str, list] = {}
    start = time.perf_counter()
    with worker_dir(args.tensorboard_dir, is_chief) as log_dir:
        if log_dir:
            fit_callbacks.append(keras.callbacks.TensorBoard(str(log_dir)))
        if steps > 0:
            history = model.fit(
                dataset,
                epochs=epochs,
                steps_per_epoch=steps,
                callbacks=[*fit_callbacks, step_log, *callbacks],
                shuffle=False,  # the dataset is shuffled, the same way on every worker
                verbose=args.verbose if is_chief else 0,
            ).history
    seconds = time.perf_counter() - start
    checkpoint = None
    if args.checkpoint_dir is not None:
        sync = getattr(model.optimizer, "sync_factors", None)
        if sync is not None:
            sync()  # every worker: the saved factors are then every replica's
        with worker_dir(args.checkpoint_dir, is_chief) as directory:
            assert directory is not None  # a directory given gives one on every worker
            model.save(checkpoint_path(directory))
        checkpoint = str(checkpoint_path(args.checkpoint_dir)) if is_chief else None
    return TrainResult(
        history={key: [float(value) for value in values] for key, values in history.items()},
        weights_sha256=weights_sha256(model),
        num_replicas=num_replicas,
        task_type=task_type,
        task_id=task_id,
        is_chief=is_chief,
        checkpoint=checkpoint,
        seconds=seconds,
        start_step=start_step,
        step_log=step_log.record,
    )


def _require_tensorboard() -> None:
    """Keras' TensorBoard callback needs the tensorboard package; say so before training."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as error:
        raise SetupError("--tensorboard-dir needs TensorBoard: pip install tensorboard") from error


def json_path(path: Path, result: TrainResult) -> Path:
    """`path` for the chief; `<stem>.<task type>-<index><suffix>` beside it for other tasks."""
    if result.is_chief:
        return path
    return path.with_name(f"{path.stem}.{result.task_type}-{result.task_id}{path.suffix}")


def write_json(path: Path, result: TrainResult, args: argparse.Namespace) -> None:
    """The result and the arguments that produced it, at `json_path(path, result)`."""
    path = json_path(path, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    arguments = {
        key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
    }
    path.write_text(json.dumps({**dataclasses.asdict(result), "args": arguments}, indent=1))


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> int:
    """Trains on flags already parsed (by `kfac_dist.jobs.train.main`), with `callbacks`
    added to `fit`'s; a setup problem (no TPU, bad cluster, too little data) is one
    line on stderr and exit status 1.

    A multi-worker run that succeeded ends its process here, once every worker
    is done, so that none logs errors about its peers' exit (kfac_dist.jobs.shutdown).
    """
    try:
        result = train(args, callbacks)
    except (SetupError, tpu.TpuUnavailableError) as error:
        print(f"{parser.prog}: {error}", file=sys.stderr, flush=True)
        return EXIT_FAILURE
    if args.json_out is not None:
        write_json(args.json_out, result, args)
    if result.is_chief and result.history:
        log = result.step_log
        print(
            f"{args.example} with {args.optimizer} on {result.num_replicas} replica(s) "
            f"({args.strategy}): loss {log['loss'][-1]:.4g} at step {log['step'][-1]} "
            f"(mean of the last epoch {result.history['loss'][-1]:.4g}), {result.seconds:.1f} s",
            flush=True,
        )
    elif result.is_chief:
        print(f"Nothing left to train: the checkpoint is at step {result.start_step}.", flush=True)
    if args.strategy == "multiworker":
        shutdown.leave_cluster(0)  # with the other workers, without their shutdown errors
    return 0
