"""K-FAC against Adam with 2 replicas: per-step time in one strategy, and placement costs.

Two settings, each measured back to back for both optimizers: MirroredStrategy
over 2 logical CPUs in this process, and MultiWorkerMirroredStrategy with 2
local worker processes (started with kfac_dist.jobs.launch; each writes its step
times to a JSON file). The MNIST autoencoder (784-512-256-32-256-512-784,
tanh; kfac_dist/jobs/examples/autoencoder.py) with batch 500 on MNIST-5k.
Also reported, from `Kfac.placement_report`: each replica's share of the
inversion cost and the bytes it hands in, per placement policy.

    python scripts/benchmark_replicas.py [--steps 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from kfac_dist.jobs import benchmarks
from kfac_dist.options import PLACEMENT_POLICIES

WARMUP_STEPS = 10
POLICIES = PLACEMENT_POLICIES
# The autoencoder's one preset (kfac_dist/jobs/benchmarks.py).
KFAC_ARGS = {**benchmarks.KFAC_DEFAULT, "momentum": benchmarks.KFAC_FIXED["momentum"]}


def _train(strategy, optimizer_name: str, steps: int, placement: str = "round_robin") -> dict:
    """Step times (seconds) of `steps` fit steps, and the placement report for K-FAC."""
    import keras
    import tensorflow as tf

    import kfac_dist as kfac
    from kfac_dist.jobs.examples import autoencoder, data

    images = data.load_mnist(verbose=False).images
    dataset = tf.data.Dataset.from_tensor_slices((images, images)).repeat().batch(500)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    with strategy.scope():
        model = autoencoder.build_autoencoder(seed=0)
        if optimizer_name == "adam":
            optimizer = keras.optimizers.Adam(1e-3)
            kfac.enable_multi_worker_fit(model)
        else:
            optimizer = kfac.Kfac(
                model=model,
                loss=autoencoder.autoencoder_loss(),
                loss_weights=autoencoder.LOSS_WEIGHT,
                placement=placement,
                **KFAC_ARGS,
            )
        autoencoder.compile_autoencoder(model, optimizer)
    times: list[float] = []
    clock: dict[str, float] = {}
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: clock.update(start=time.perf_counter()),
        on_train_batch_end=lambda batch, logs: times.append(time.perf_counter() - clock["start"]),
    )
    model.fit(dataset, steps_per_epoch=steps, epochs=1, callbacks=[timer], verbose=0)
    result = {"step_seconds": times}
    if optimizer_name == "kfac":
        result["placement"] = optimizer.placement_report(as_dict=True)
    return result


def ms_per_step(times: list[float]) -> float:
    steady = times[WARMUP_STEPS:] or times
    return 1000.0 * sum(steady) / len(steady)


def mirrored(steps: int) -> dict:
    """Both optimizers under MirroredStrategy over 2 logical CPUs, in this process."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    out = {name: _train(strategy, name, steps) for name in ("adam", "kfac")}
    out["placement"] = {
        policy: _train(strategy, "kfac", 1, policy)["placement"] for policy in POLICIES
    }
    return out


def multi_worker(steps: int) -> dict:
    """Both optimizers on 2 local workers (MultiWorkerMirroredStrategy), one launch each."""
    from kfac_dist.jobs import launch

    out = {}
    with tempfile.TemporaryDirectory() as directory:
        for name in ("adam", "kfac"):
            path = Path(directory) / f"{name}.json"
            command = [sys.executable, "-m", "kfac_dist.jobs.replica_benchmark", "--worker", name]
            command += ["--steps", str(steps), "--out", str(path)]
            code = launch.run_local(command, 2, on_line=lambda i, line: None)
            if code != 0:
                raise RuntimeError(f"the 2-worker {name} run failed with exit code {code}")
            out[name] = json.loads(path.read_text())
    return out


def _worker(name: str, steps: int, out: Path) -> None:
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    result = _train(strategy, name, steps)
    if strategy.cluster_resolver.task_id == 0:
        out.write_text(json.dumps(result))


def markdown(results: dict) -> str:
    lines = [
        "| setting | Adam ms/step | K-FAC ms/step | K-FAC/Adam |",
        "|---|---:|---:|---:|",
    ]
    for setting, label in (
        ("mirrored", "Mirrored, 2 logical CPUs"),
        ("multi_worker", "2 local workers"),
    ):
        if setting not in results:
            continue
        adam = ms_per_step(results[setting]["adam"]["step_seconds"])
        kfac = ms_per_step(results[setting]["kfac"]["step_seconds"])
        lines.append(f"| {label} | {adam:.1f} | {kfac:.1f} | {kfac / adam:.2f} |")
    if "mirrored" in results:
        lines += [
            "",
            "| policy | replica 0 share | replica 1 share | max share "
            "| bytes per factor sync | bytes per inverse share |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for policy, report in results["mirrored"]["placement"].items():
            shares = [r["share"] for r in report["replicas"]]
            lines.append(
                f"| {policy} | {shares[0]:.1%} | {shares[1]:.1%} | {max(shares):.1%} | "
                f"{report['bytes_per_factor_sync']:,} | {report['bytes_per_inverse_share']:,} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", choices=("adam", "kfac"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.worker:
        _worker(args.worker, args.steps, args.out)
        return 0
    # The workers start first: this process then splits its own CPU.
    results = {"multi_worker": multi_worker(args.steps)}
    results["mirrored"] = mirrored(args.steps)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
