"""The ResNet-50 benchmark: K-FAC's step cost and peak memory against Adam's, in one run.

    python scripts/benchmark_resnet.py                          # one device, ResNet-50, batch 32
    python scripts/benchmark_resnet.py --replicas 2             # Mirrored over 2 logical CPUs
    python scripts/benchmark_resnet.py --kfac-arg max_factor_dim=1024 --json out.json
    python scripts/benchmark_resnet.py --replicas 1 2 --write   # also update BENCHMARKS.md

A keras.applications model (default `ResNet50(weights=None, input_shape=(32,
32, 3), classes=10)`) is trained by `model.fit` on synthetic data (random
images and labels, fixed seed) with a timing callback around every step.
Each optimizer, and each K-FAC variant, runs in its own subprocess (a fresh
TensorFlow), so its peak RSS — the child's `ru_maxrss`, from `os.wait4` — is
its own. The variants split K-FAC's step into where the time goes:

- "kfac": K-FAC at the settings the docs recommend for convnets (KFAC_CONVNET);
- "kfac_no_statistics": the same with `cov_update_every` beyond the run (the
  factor statistics are computed at step 0 only);
- "kfac_no_inversion": the same with `invert_every` beyond the run and no
  staggering (inverse updates, and with them the lazy factor sync and the
  inverse sharing, at step 0 only);
- "kfac_neither": both switched off (what is left: capture, preconditioning,
  the update).

so that statistics ≈ kfac − kfac_no_statistics, inversion (with its factor
sync and sharing under replicas) ≈ kfac − kfac_no_inversion, and
preconditioning and the rest ≈ kfac_neither − Adam, each on the amortized
step. Reported per run: the first step (tracing included), the median, the
max, the amortized step (mean of the whole inverse periods after the first
step), the peak RSS, the optimizer's variables, and for K-FAC its placement
report's memory (state, buffers) and the bytes of its factor sync and
inverse sharing; then the ratios K-FAC/Adam against the floors (issue 12:
amortized ≤ 2×, first step ≤ 1.5×, peak RSS ≤ 1.5× on one device and ≤ 2×
under 2 replicas). The machine is shared, so only ratios measured in one run
mean anything. The flags are parsed before TensorFlow loads (`--help`
answers at once); `scripts/benchmark_resnet.py` and the console script
`kfac-benchmark-resnet` call `main`.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kfac_dist.jobs import benchmarks

# The settings the docs recommend for convnets: the README's starting point
# (starting_point_benchmark: statistics every 5 steps, inverses every 10,
# Cholesky) with staggered inverse updates (Kfac's docstring: "Recommended for
# large models (convnets)") and factors split at 512 (`max_factor_dim`): the
# README shows them for convnets.
KFAC_CONVNET: dict[str, Any] = {
    "learning_rate": 0.3,
    "damping": 0.01,
    "norm_constraint": 0.03,
    "momentum": 0.9,
    "invert_every": 10,
    "cov_update_every": 5,
    "cov_ema_decay": 0.95,
    "stagger_inverses": True,
    "max_factor_dim": 512,
    "estimation_mode": "sampled",
    "inverse_method": "cholesky",
}
ADAM_LEARNING_RATE = 1e-3
NEVER = 10**9  # an invert_every / cov_update_every that no run reaches
TINY = "tiny"  # a small conv net standing in for a keras.applications model (tests)
CLASSES = 10
SAMPLES = 4  # distinct synthetic batches, repeated

VARIANTS = ("adam", "kfac", "kfac_no_statistics", "kfac_no_inversion", "kfac_neither")
VARIANT_LABELS = {
    "adam": "Adam",
    "kfac": "K-FAC",
    "kfac_no_statistics": "K-FAC, no statistics",
    "kfac_no_inversion": "K-FAC, no inversion",
    "kfac_neither": "K-FAC, neither",
}
SETTING_LABELS = {
    1: "One device",
    2: "MirroredStrategy, 2 logical CPUs (ReductionToOneDevice)",
}
# The floors, as ratios K-FAC/Adam measured in one run (issue 12, points 1 and 6).
FLOORS = {"amortized": 2.0, "first": 1.5}
RSS_FLOORS = {1: 1.5, 2: 2.0}

SECTION_HEADING = "## ResNet-50 step and memory against Adam"
GIB = 2**30


# --- the variants ------------------------------------------------------------------------
def kfac_arguments(
    variant: str, invert_every: int, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The Kfac keyword arguments of a K-FAC variant (the recommended ones, then `extra`)."""
    if variant not in VARIANTS or variant == "adam":
        raise ValueError(f"{variant!r} is not a K-FAC variant; expected one of {VARIANTS[1:]}.")
    arguments = {**KFAC_CONVNET, "invert_every": invert_every, **(extra or {})}
    if variant in ("kfac_no_statistics", "kfac_neither"):
        arguments["cov_update_every"] = NEVER
    if variant in ("kfac_no_inversion", "kfac_neither"):
        arguments["invert_every"] = NEVER
        arguments["stagger_inverses"] = False
    return arguments


def parse_kfac_arg(text: str) -> tuple[str, Any]:
    """`key=value` with the value as a Python literal (a bare word stays a string)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"--kfac-arg expects key=value, got {text!r}.")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


# --- one run (the child process) ------------------------------------------------------------
def build_model(name: str, input_size: int, seed: int) -> Any:
    """The keras.applications model `name` (no weights, CLASSES classes), or the tiny stand-in."""
    import keras

    keras.utils.set_random_seed(seed)
    shape = (input_size, input_size, 3)
    if name == TINY:
        inputs = keras.Input(shape)
        h = keras.layers.Conv2D(4, 3, padding="same", name="conv_1")(inputs)
        h = keras.layers.BatchNormalization(name="bn_1")(h)
        h = keras.layers.Activation("relu")(h)
        r = keras.layers.Conv2D(4, 3, padding="same", name="conv_2")(h)
        h = keras.layers.Add()([h, r])
        h = keras.layers.GlobalAveragePooling2D()(h)
        outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(h)
        return keras.Model(inputs, outputs, name="tiny_convnet")
    application = getattr(keras.applications, name, None)
    if not callable(application):
        raise ValueError(
            f"--model {name!r} is neither a keras.applications model (e.g. ResNet50) nor {TINY!r}."
        )
    return application(weights=None, input_shape=shape, classes=CLASSES)


def _variable_bytes(variables: Sequence[Any]) -> int:
    import numpy as np

    return sum(
        int(np.prod(v.shape, dtype=np.int64)) * np.dtype(str(v.dtype)).itemsize for v in variables
    )


def _own_memory() -> dict[str, int]:
    """This process' VmRSS and VmHWM (its peak RSS so far), in bytes ({} off Linux)."""
    found = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return found


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Trains `spec["steps"]` fit steps of one variant; its step times, loss and memory."""
    import tensorflow as tf

    replicas = int(spec["replicas"])
    if replicas > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * replicas
        )
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(replicas)],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    else:
        strategy = tf.distribute.get_strategy()
    import keras
    import numpy as np

    import kfac_dist

    rng = np.random.default_rng(spec["seed"])
    size, batch = spec["input_size"], spec["batch"]
    x = rng.normal(size=(SAMPLES * batch, size, size, 3)).astype("float32")
    y = rng.integers(0, CLASSES, SAMPLES * batch).astype("int32")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(batch, drop_remainder=True)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    with strategy.scope():
        model = build_model(spec["model"], size, spec["seed"])
        loss = keras.losses.SparseCategoricalCrossentropy()
        if spec["variant"] == "adam":
            optimizer: Any = keras.optimizers.Adam(ADAM_LEARNING_RATE)
        else:
            optimizer = kfac_dist.Kfac(model=model, loss=loss, seed=spec["seed"], **spec["kfac"])
        model.compile(optimizer=optimizer, loss=loss)
    times: list[float] = []
    losses: list[float] = []
    resident: list[int] = []  # RSS after each step
    high_water: list[int] = []  # the peak RSS so far, after each step
    clock: dict[str, float] = {}

    def begin(batch_index: int, logs: Any) -> None:
        clock["start"] = time.perf_counter()

    def end(batch_index: int, logs: Any) -> None:
        times.append(time.perf_counter() - clock["start"])
        losses.append(float((logs or {}).get("loss", float("nan"))))
        memory = _own_memory()
        resident.append(memory.get("VmRSS", 0))
        high_water.append(memory.get("VmHWM", 0))

    timer = keras.callbacks.LambdaCallback(on_train_batch_begin=begin, on_train_batch_end=end)
    model.fit(dataset, steps_per_epoch=spec["steps"], epochs=1, callbacks=[timer], verbose=0)
    result: dict[str, Any] = {
        "step_seconds": times,
        "losses": losses,
        "rss_after_step": resident,
        "peak_rss_after_step": high_water,
        "parameters": int(model.count_params()),
        "optimizer_variable_bytes": _variable_bytes(optimizer.variables),
        "self_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if spec["variant"] != "adam":
        placement = optimizer.placement_report(as_dict=True)
        memory = placement["replicas"][0].get("memory") or {}
        result["placement"] = {
            "units": len(placement.get("units", [])) or None,
            "state_bytes_per_replica": placement["replicas"][0].get("state_bytes"),
            "memory_per_replica": memory,
            "bytes_per_factor_sync": placement.get("bytes_per_factor_sync"),
            "bytes_per_inverse_share": placement.get("bytes_per_inverse_share"),
            "sharing_method": placement.get("sharing_method"),
        }
    return result


# --- the runs (the parent) ------------------------------------------------------------------
def _rss_bytes(pid: int) -> int:
    """The resident set of process `pid` now (0 when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(spec: dict[str, Any], rss_limit_bytes: int | None = None) -> dict[str, Any]:
    """Runs one variant in a fresh Python (TensorFlow) process; its result and its peak RSS.

    The peak is the child's own `ru_maxrss` from `os.wait4`, so it holds even
    when the child fails; a child whose RSS passes `rss_limit_bytes` is
    killed (the machine is shared) and reported as such.
    """
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "result.json")
        command = [sys.executable, "-m", "kfac_dist.jobs.resnet_benchmark"]
        command += ["--worker", json.dumps(spec), "--worker-out", out]
        # The child imports this same package (not another install of it).
        top = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
        path = os.pathsep.join(p for p in (top, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path}
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        started = time.perf_counter()
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        stderr: list[str] = []
        killed_at = None
        # Read stderr on the side, so that the child never blocks on a full pipe.
        reader = threading.Thread(target=lambda: stderr.extend(process.stderr or []), daemon=True)
        reader.start()
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if rss_limit_bytes and killed_at is None and _rss_bytes(process.pid) > rss_limit_bytes:
                killed_at = _rss_bytes(process.pid)
                process.kill()
            time.sleep(0.2)
        process.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it
        reader.join(timeout=5)
        result: dict[str, Any] = {}
        if process.returncode == 0 and os.path.exists(out):
            with open(out, encoding="utf-8") as f:
                result = json.load(f)
        result.update(
            variant=spec["variant"],
            exit_code=process.returncode,
            wall_seconds=time.perf_counter() - started,
            peak_rss_bytes=usage.ru_maxrss * 1024,
        )
        if killed_at is not None:
            result["error"] = f"killed at RSS {killed_at / GIB:.1f} GiB (--rss-limit-gb)"
        elif process.returncode != 0:
            result["error"] = "".join(stderr[-15:]).strip() or f"exit code {process.returncode}"
        return result


def summarize(seconds: Sequence[float], invert_every: int) -> dict[str, Any]:
    """First, median, max and amortized step of a run's step times (seconds).

    The amortized step is the mean of the whole inverse periods after the
    first step (steps 1 .. k·invert_every); with too few steps for one, the
    mean of every step after the first (`whole_periods` 0).
    """
    if not seconds:
        return {}
    rest = list(seconds[1:])
    periods = len(rest) // invert_every
    window = rest[: periods * invert_every] if periods else rest
    return {
        "first": seconds[0],
        "median": statistics.median(rest) if rest else None,
        "max": max(rest) if rest else None,
        "amortized": sum(window) / len(window) if window else None,
        "whole_periods": periods,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyse(runs: dict[str, dict[str, Any]], invert_every: int, replicas: int) -> dict[str, Any]:
    """Each run's summary, the ratios K-FAC/Adam with the floors, and the time breakdown."""
    summaries = {
        name: {
            **summarize(run.get("step_seconds", []), invert_every),
            "peak_rss_bytes": run.get("peak_rss_bytes"),
        }
        for name, run in runs.items()
    }
    adam, kfac = summaries.get("adam", {}), summaries.get("kfac", {})
    ratios = {
        key: _ratio(kfac.get(key), adam.get(key))
        for key in ("first", "median", "max", "amortized", "peak_rss_bytes")
    }
    floors = {**FLOORS, "peak_rss_bytes": RSS_FLOORS.get(replicas, RSS_FLOORS[2])}
    met: dict[str, bool | None] = {}
    for key, bound in floors.items():
        value = ratios[key]
        met[key] = None if value is None else value <= bound

    def amortized(name: str) -> float | None:
        return summaries.get(name, {}).get("amortized")

    def minus(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    parts = {
        "statistics": minus(amortized("kfac"), amortized("kfac_no_statistics")),
        "inversion": minus(amortized("kfac"), amortized("kfac_no_inversion")),
        "preconditioning_and_rest": minus(amortized("kfac_neither"), amortized("adam")),
    }
    known = [v for v in parts.values() if v is not None]
    over = minus(amortized("kfac"), amortized("adam"))
    if over is not None and len(known) == len(parts):
        parts["not_additive"] = over - sum(known)
    # The same two parts measured with the other one off: a second estimate of each
    # (on a loaded machine the two can disagree by more than a part).
    parts["statistics_without_inversion"] = minus(
        amortized("kfac_no_inversion"), amortized("kfac_neither")
    )
    parts["inversion_without_statistics"] = minus(
        amortized("kfac_no_statistics"), amortized("kfac_neither")
    )
    return {
        "summaries": summaries,
        "ratios": ratios,
        "floors": floors,
        "floors_met": met,
        "breakdown_seconds": parts,
        "breakdown_over_adam": {k: _ratio(v, amortized("adam")) for k, v in parts.items()},
    }


def run_setting(
    args: argparse.Namespace,
    replicas: int,
    progress: Callable[[str], None] | None = None,
    partial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every variant of `args.variants` under one replica count, each in its subprocess.

    `partial` gets the setting's result so far after each run (a long run
    stopped half-way keeps what it measured).
    """
    extra = dict(args.kfac_arg)
    runs: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        spec = {
            "variant": variant,
            "model": args.model,
            "input_size": args.input_size,
            "batch": args.batch,
            "steps": args.steps,
            "replicas": replicas,
            "seed": args.seed,
            "kfac": None
            if variant == "adam"
            else kfac_arguments(variant, args.invert_every, extra),
        }
        if progress:
            progress(f"[{replicas} replica(s)] {variant}: {args.steps} steps ...")
        limit = int(args.rss_limit_gb * GIB) if args.rss_limit_gb else None
        run = run_child(spec, limit)
        run["kfac_arguments"] = spec["kfac"]
        runs[variant] = run
        if progress:
            done = summarize(run.get("step_seconds", []), args.invert_every)
            note = run.get("error", "").splitlines()[-1:] or [""]
            progress(
                f"  first {_s(done.get('first'))}, amortized {_s(done.get('amortized'))}, "
                f"peak RSS {_gib(run.get('peak_rss_bytes'))} {note[0]}"
            )
        result = {
            "replicas": replicas,
            "setting": SETTING_LABELS.get(replicas, f"MirroredStrategy, {replicas} logical CPUs"),
            "runs": runs,
            "invert_every": args.invert_every,
            "steps": args.steps,
            **analyse(runs, args.invert_every, replicas),
        }
        if partial:
            partial(result)
    return result


# --- the report ---------------------------------------------------------------------------
def _s(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} s" if abs(value) >= 0.1 else f"{1000 * value:.1f} ms"


def _gib(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value / GIB:.2f} GiB" if value >= 0.1 * GIB else f"{value / 2**20:.1f} MiB"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def setting_markdown(result: dict[str, Any], command: str) -> str:
    """One replica count's subsection: the command, the table, the breakdown, the memory."""
    runs, summaries = result["runs"], result["summaries"]
    names = [n for n in VARIANTS if n in runs]
    first = runs[names[0]] if names else {}
    parameters = first.get("parameters")
    about = f"{result.get('date', '')}" + (f"; {parameters:,} parameters" if parameters else "")
    if "`; `" in command:
        about += "; the runs of these invocations, one after the other"
    lines = [
        f"### {result['setting']}",
        "",
        f"`{command}` ({about})",
        "",
        "| | " + " | ".join(VARIANT_LABELS[n] for n in names) + " | K-FAC/Adam | floor |",
        "|---|" + "---:|" * (len(names) + 2),
    ]
    rows = (
        ("first step (tracing)", "first", _s),
        ("median step", "median", _s),
        ("max step", "max", _s),
        ("amortized step", "amortized", _s),
        ("peak RSS", "peak_rss_bytes", _gib),
    )
    # A run killed at the RSS limit peaked above what it reached.
    killed = {n for n in names if "killed at RSS" in runs[n].get("error", "")}
    for label, key, fmt in rows:
        cells = [
            ("> " if key == "peak_rss_bytes" and n in killed else "") + fmt(summaries[n].get(key))
            for n in names
        ]
        ratio = result["ratios"].get(key)
        bound = result["floors"].get(key)
        met = result["floors_met"].get(key)
        floor = (
            ""
            if bound is None
            else f"≤ {bound:g}× " + ("✓" if met else "✗" if met is False else "")
        )
        above = "> " if key == "peak_rss_bytes" and "kfac" in killed and ratio is not None else ""
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {above}{_x(ratio)} | {floor.strip()} |"
        )

    def after(name: str, key: str, index: int) -> str:
        values = runs[name].get(key) or []
        return _gib(values[index]) if values and values[index] else "—"

    for label, key, index in (
        ("peak RSS by the end of the first step", "peak_rss_after_step", 0),
        ("RSS after the last step", "rss_after_step", -1),
    ):
        cells = [after(n, key, index) for n in names]
        if any(cell != "—" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " | | |")
    lines.append(
        "| last loss | "
        + " | ".join(
            f"{runs[n]['losses'][-1]:.3f}" if runs[n].get("losses") else "—" for n in names
        )
        + " | | |"
    )
    lines.append(
        "| optimizer variables | "
        + " | ".join(_gib(runs[n].get("optimizer_variable_bytes")) for n in names)
        + " | | |"
    )
    failed = [n for n in names if runs[n].get("error")]
    for name in failed:
        error = runs[name]["error"].splitlines()[-1]
        lines += ["", f"{VARIANT_LABELS[name]} did not finish: {error}"]
    part = result["breakdown_seconds"]
    share = result["breakdown_over_adam"]
    if any(v is not None for v in part.values()):
        labels = {
            "statistics": "statistics (K-FAC − no statistics)",
            "inversion": "inversion, with its factor sync and sharing (K-FAC − no inversion)",
            "preconditioning_and_rest": "preconditioning and the rest (neither − Adam)",
            "not_additive": "not additive (K-FAC − Adam − the three)",
            "statistics_without_inversion": "statistics, inversions off (no inversion − neither)",
            "inversion_without_statistics": "inversion, statistics off (no statistics − neither)",
        }
        lines += [
            "",
            "Where K-FAC's amortized step goes (seconds, and × Adam's amortized step):",
            "",
        ]
        lines += ["| part | seconds | × Adam's step |", "|---|---:|---:|"]
        for key, label in labels.items():
            if part.get(key) is not None:
                value = part[key]
                lines.append(f"| {label} | {_s(value)} | {_x(share.get(key))} |")
    kfac = runs.get("kfac", {}).get("placement")
    if kfac:
        memory = kfac.get("memory_per_replica") or {}
        lines += [
            "",
            "K-FAC memory per replica (placement_report): state "
            f"{_gib(memory.get('state'))} (factor sums {_gib(memory.get('factor_sums'))}, "
            f"inverses {_gib(memory.get('inverses'))}), buffers {_gib(memory.get('buffers'))} "
            f"(factor sync chunk {_gib(memory.get('sync_buffer'))}, inverse sharing "
            f"{_gib(memory.get('share_buffer'))}); bytes handed in per factor sync "
            f"{_gib(kfac.get('bytes_per_factor_sync'))}, per inverse share "
            f"{_gib(kfac.get('bytes_per_inverse_share'))} ({kfac.get('sharing_method')}).",
        ]
    arguments = runs.get("kfac", {}).get("kfac_arguments")
    if arguments:
        text = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        lines += ["", f"K-FAC settings: `{text}`."]
    return "\n".join(lines) + "\n"


INTRO = """\
Written by `python scripts/benchmark_resnet.py --write`
(kfac_dist/jobs/resnet_benchmark.py): `keras.applications.ResNet50(weights=None,
input_shape=(32, 32, 3), classes=10)` trained by `model.fit` on synthetic data
(random images and labels, fixed seed), each optimizer and each K-FAC variant
in its own subprocess, so that each peak RSS (`ru_maxrss` of the child) is its
own. K-FAC runs at the settings the docs recommend for convnets (staggered
inverse updates, every 10 steps; listed under each table). The first step
includes tracing; the amortized step is the mean over the whole inverse
periods after it. The variants switch off the statistics (`cov_update_every`
beyond the run) or the inversions (`invert_every` beyond the run, not
staggered; with them the lazy factor sync and the inverse sharing), or both.
The machine's 2 cores are shared with other jobs, so only the ratios within
one run mean anything; the communication under 2 replicas is not timed apart
from the inversion it comes with (its bytes are given). Floors (issue 12):
amortized step ≤ 2× Adam's, first step ≤ 1.5× Adam's, peak RSS ≤ 1.5× Adam's
on one device and ≤ 2× under 2 replicas.
"""


def _subsections(section: str) -> dict[str, str]:
    """The `### ` subsections of a section's text, by heading line."""
    found: dict[str, list[str]] = {}
    current: list[str] | None = None
    fenced = False
    for line in section.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and line.startswith("### "):
            current = found.setdefault(line.rstrip(), [])
        if current is not None:
            current.append(line)
    return {heading: "".join(lines).rstrip("\n") + "\n" for heading, lines in found.items()}


def existing_section(path: str) -> str:
    """This benchmark's section of the markdown file at `path` ("" when there is none)."""
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.rstrip() == SECTION_HEADING:
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].startswith(("# ", "## "))),
                len(lines),
            )
            return "".join(lines[i:end])
    return ""


def benchmark_markdown(results: Sequence[dict[str, Any]], keep: str = "") -> str:
    """The BENCHMARKS.md section: the intro, then one subsection per replica count.

    Subsections of `keep` (the section as it stands) for replica counts not
    run now are kept, so one device and 2 replicas can be run apart.
    """
    new = {}
    for result in results:
        text = setting_markdown(result, result["command"])
        new[text.splitlines()[0]] = text
    merged = {**_subsections(keep), **new}
    order = [f"### {label}" for label in SETTING_LABELS.values()]
    headings = sorted(merged, key=lambda h: order.index(h) if h in order else len(order))
    body = "\n".join(merged[h] for h in headings)
    return f"{SECTION_HEADING}\n\n{INTRO}\n{body}"


def _load(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return dict(json.load(f))


def merge_results(payloads: Sequence[dict[str, Any]], invert_every: int) -> list[dict[str, Any]]:
    """The settings of several `--json` files, those of one replica count merged.

    A later file's run of a variant replaces an earlier one's; a merged
    setting lists every command and date, and is analysed again.
    """
    merged: dict[int, dict[str, Any]] = {}
    for payload in payloads:
        for result in payload["settings"]:
            replicas = int(result["replicas"])
            into = merged.setdefault(replicas, {**result, "runs": {}, "commands": [], "dates": []})
            into["runs"].update(result["runs"])
            into["commands"].append(result.get("command", payload["command"]))
            into["dates"].append(result.get("date", payload.get("date", "")))
    out = []
    for replicas, result in sorted(merged.items()):
        commands, dates = result.pop("commands"), result.pop("dates")
        result["command"] = "`; `".join(dict.fromkeys(commands))
        result["date"] = ", ".join(dict.fromkeys(dates))
        period = int(result.get("invert_every", invert_every))
        out.append({**result, **analyse(result["runs"], period, replicas)})
    return out


# --- the command line -----------------------------------------------------------------------
DESCRIPTION = (
    "Command line of the ResNet-50 benchmark: K-FAC's step cost and peak memory against "
    "Adam's, each optimizer (and each K-FAC variant) in its own subprocess."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument(
        "--model", default="ResNet50", help=f"a keras.applications name, or {TINY!r} (tests)"
    )
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument(
        "--invert-every",
        type=int,
        default=KFAC_CONVNET["invert_every"],
        help="K-FAC's inverse period, and the amortization window",
    )
    parser.add_argument(
        "--steps", type=int, help="fit steps per run (default: 1 warm-up + 2 inverse periods)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        nargs="+",
        choices=(1, 2),
        default=[1],
        help="1: one device; 2: MirroredStrategy over 2 logical CPUs (both: one after the other)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which runs (adam and kfac give the ratios; the others the breakdown)",
    )
    parser.add_argument(
        "--kfac-arg",
        type=parse_kfac_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Kfac keyword argument, the value a Python literal (repeatable), "
        "e.g. --kfac-arg max_factor_dim=1024",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rss-limit-gb",
        type=float,
        default=16.0,
        help="kill a run whose RSS passes this (the machine is shared; 0: no limit)",
    )
    benchmarks.add_result_flags(parser)
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="PATH",
        help="run nothing: the section (and --write) from earlier --json files",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a child: one run's JSON spec
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags; `--steps` defaults to 1 + 2·invert_every."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.invert_every < 1:
        parser.error("--invert-every must be at least 1")
    if args.steps is None:
        args.steps = 1 + 2 * args.invert_every
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step and one more)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark, prints its section (and writes `--json`, `--write`); status 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        result = run_one(json.loads(args.worker))
        with open(args.worker_out, "w", encoding="utf-8") as f:
            json.dump(result, f)
        return 0
    shown = [a for a in argv if a not in ("--write", "--quiet")]
    command = shlex.join(["python", "scripts/benchmark_resnet.py", *shown])
    date = datetime.date.today().isoformat()
    results = []
    if args.from_json:
        results = merge_results([_load(path) for path in args.from_json], args.invert_every)
    else:

        def save(done: list[dict[str, Any]]) -> None:
            if args.json and args.json != "-":
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump({"command": command, "date": date, "settings": done}, f, indent=1)

        tag = {"date": date, "command": command}
        for replicas in args.replicas:
            result = run_setting(
                args,
                replicas,
                None if args.quiet else benchmarks.progress,
                lambda r: save([*results, {**r, **tag}]),
            )
            results.append({**result, **tag})
    keep = existing_section(args.output) if args.write else ""
    section = benchmark_markdown(results, keep)
    benchmarks.publish(
        args,
        section,
        lambda: json.dumps({"command": command, "date": date, "settings": results}, indent=1),
    )
    for result in results:
        verdict = ", ".join(
            f"{key} {'met' if met else 'NOT met' if met is False else 'not measured'}"
            for key, met in result["floors_met"].items()
        )
        print(f"{result['setting']}: floors: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
