"""First-`fit` time (trace and first step) of K-FAC against Adam under MirroredStrategy.

Each measurement runs in a fresh process (logical CPUs are set once per
process, and a second fit would reuse the traced step): a stack of `layers`
Dense(16, tanh) layers on 2 logical CPUs, one `fit` of one batch, timed from
the call to its return, in wall and in process CPU seconds (tracing and
graph optimisation are single-threaded, so on a shared machine CPU time is
the steadier figure). Adam and K-FAC run back to back for each depth, so
their ratio is measured in one run on the same machine under the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HEADING = "## Trace time: first fit under MirroredStrategy (2 logical CPUs)"
DEFAULT_LAYERS = (10, 40, 80)


def first_fit_seconds(layers: int, optimizer: str) -> tuple[float, float]:
    """Wall and CPU seconds of the first `fit` (one batch) of a `layers`-deep MLP, here."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np

    import kfac_dist

    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16)).astype("float32")
    y = rng.normal(size=(32, 16)).astype("float32")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [keras.Input((16,))]
            + [keras.layers.Dense(16, activation="tanh") for _ in range(layers)]
        )
        if optimizer == "adam":
            opt = keras.optimizers.Adam(1e-3)
        else:
            opt = kfac_dist.Kfac(learning_rate=0.01, damping=0.1, model=model, loss="mse")
        model.compile(optimizer=opt, loss="mse")
    start, cpu_start = time.perf_counter(), time.process_time()
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure(layers: int, optimizer: str, timeout: float) -> tuple[float, float]:
    """`first_fit_seconds` in a fresh Python process."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "kfac_dist.jobs.trace_benchmark", "--child", str(layers), optimizer],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return float(result["seconds"]), float(result["cpu_seconds"])


Row = tuple[int, tuple[float, float], tuple[float, float]]  # layers, Adam, K-FAC (wall, CPU)


def markdown(rows: list[Row]) -> str:
    lines = [
        HEADING,
        "",
        "`python scripts/benchmark_trace.py --write`: one `fit` of one batch (trace and",
        "first step) of a stack of Dense(16, tanh) layers, each figure in a fresh process,",
        "Adam and K-FAC (round-robin placement, Cholesky) back to back.",
        "",
        "| Dense layers | Adam (s) | K-FAC (s) | K-FAC / Adam | Adam CPU (s) | K-FAC CPU (s) "
        "| K-FAC / Adam (CPU) | K-FAC s per layer |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for layers, (adam, adam_cpu), (kfac, kfac_cpu) in rows:
        lines.append(
            f"| {layers} | {adam:.1f} | {kfac:.1f} | {kfac / adam:.2f} | {adam_cpu:.1f} "
            f"| {kfac_cpu:.1f} | {kfac_cpu / adam_cpu:.2f} | {kfac / layers:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=list(DEFAULT_LAYERS))
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--write", metavar="PATH", nargs="?", const="BENCHMARKS.md")
    parser.add_argument("--child", nargs=2, metavar=("LAYERS", "OPTIMIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        layers, optimizer = int(args.child[0]), args.child[1]
        seconds, cpu_seconds = first_fit_seconds(layers, optimizer)
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds}))
        return 0
    if any(n < 1 for n in args.layers):
        parser.error(f"--layers must be >= 1, got {args.layers}")
    rows = []
    for layers in args.layers:
        adam = measure(layers, "adam", args.timeout)
        kfac = measure(layers, "kfac", args.timeout)
        rows.append((layers, adam, kfac))
        print(
            f"{layers} layers: Adam {adam[0]:.1f} s ({adam[1]:.1f} s CPU), "
            f"K-FAC {kfac[0]:.1f} s ({kfac[1]:.1f} s CPU)",
            flush=True,
        )
    section = markdown(rows)
    print(section)
    if args.write:
        from kfac_dist.jobs.tuner import write_markdown_section

        write_markdown_section(args.write, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
