"""Statistics-pass benchmark: conv factors from patches or views, and K-FAC's step against Adam.

Three measurements, each printed as one table (BENCHMARKS.md):

- `layer`: one ResNet-50-like 3×3 "same" Conv2D (filters = channels), its
  input factor A from the whole batch's patch rows (PᵀP, kept here as the
  reference) and as `ConvBlock.statistics` builds it (shifted views at
  stride 1, `blocks/patch_moments.py`): the time per call, the peak
  resident memory above the traced function's (each variant in its own
  subprocess, since CPU allocations are only seen there), and the largest
  tensor in the graph, loop bodies included;
- `diagonal`: the step time of models preconditioned only by diagonal blocks
  (Conv2D/SeparableConv2D/Dense with fisher_approx="diagonal"; the same
  layers unsupported, each a generic diagonal block) against Adam's, in
  interleaved rounds, and the same K-FAC step without statistics (the
  floor of the rest of the step);
- `convnet`: the step time of a small convnet whose flattened features feed
  a Dense layer (2,705 inputs) under K-FAC (Kronecker blocks) against Adam.

`kfac-benchmark-statistics [layer|diagonal|convnet ...]` (all by default).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

LAYER_SHAPES = ((8, 8, 256), (32, 32, 64))
BATCH = 32
#: The memory is measured on a larger batch, so that the statistics outweigh the
#: process's own allocations (CPU memory is only seen as the peak RSS).
MEMORY_BATCH = 256


def _layer_function(variant: str, height: int, channels: int, batch: int) -> tuple:
    """(traced function, its input) of one variant's A for one layer."""
    import keras
    import numpy as np
    import tensorflow as tf

    from kfac_dist.blocks import ConvBlock
    from kfac_dist.blocks.records import kron_factors

    layer = keras.layers.Conv2D(channels, 3, padding="same")
    shape = (batch, height, height, channels)
    x = tf.constant(np.random.default_rng(0).normal(size=shape), "float32")
    layer.build(x.shape)
    block = ConvBlock(layer)

    @tf.function
    def factor(inputs: tf.Tensor) -> tf.Tensor:
        _, record = block.record(layer, inputs)
        if variant == "baseline":  # the layer call alone: what every variant also holds
            return tf.reduce_sum(record.outputs)
        if variant == "patches":
            rows = block.input_rows(record)
            return kron_factors(rows, rows[:, :1], batch)[0]
        grads = tf.zeros([1, *record.outputs.shape])
        return block.statistics([record], [grads], batch)[0]

    return factor.get_concrete_function(x), x


def _layer_memory(variant: str, height: int, channels: int, batch: int) -> dict:
    """Peak RSS of one call above the traced function's, and the graph's largest tensor."""
    function, x = _layer_function(variant, height, channels, batch)
    largest = largest_tensor_bytes(function.graph)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    function(x).numpy()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": (peak - base) / 1024, "largest_mib": largest / 2**20}


def largest_tensor_bytes(graph: Any, op_type: str | None = None) -> int:
    """Bytes of the largest floating tensor of static shape in `graph` or a function it calls.

    A while loop's, a cond's or a call's body is a function of its own: its
    tensors are not among the graph's operations, so each is searched too.
    `op_type` (e.g. "ExtractImagePatches") counts only that op's outputs.
    """
    largest = 0
    for op in graph.get_operations():
        if op_type is None or op.type == op_type:
            for t in op.outputs:
                if t.dtype.is_floating:
                    largest = max(largest, (t.shape.num_elements() or 0) * t.dtype.size)
        for attr in ("body", "cond", "then_branch", "else_branch", "f"):
            try:
                called = op.get_attr(attr)
            except ValueError:
                continue
            name = getattr(called, "name", "")
            function = graph._get_function(name) if name else None
            if function is not None:
                largest = max(largest, largest_tensor_bytes(function.graph, op_type))
    return largest


def layer_table(rounds: int = 7) -> list[dict]:
    rows = []
    for height, _, channels in LAYER_SHAPES:
        memory = {}
        for variant in ("baseline", "patches", "views"):
            args = json.dumps([variant, height, channels, MEMORY_BATCH])
            out = subprocess.run(
                [sys.executable, __file__, "--layer-memory", args],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
            ).stdout
            memory[variant] = json.loads(out.strip().splitlines()[-1])
        functions = {v: _layer_function(v, height, channels, BATCH) for v in ("patches", "views")}
        for function, x in functions.values():
            function(x).numpy()
        times: dict[str, list[float]] = {v: [] for v in functions}
        for _ in range(rounds):  # interleaved: a shared machine's load hits both alike
            for v, (function, x) in functions.items():
                start = time.perf_counter()
                function(x).numpy()
                times[v].append(time.perf_counter() - start)
        for v in functions:
            rows.append(
                {
                    "shape": f"{height}x{height}x{channels}",
                    "variant": v,
                    "ms": 1e3 * statistics.median(times[v]),
                    "extra_mib": memory[v]["peak_mib"] - memory["baseline"]["peak_mib"],
                    "largest_mib": memory[v]["largest_mib"],
                    "input_mib": MEMORY_BATCH * height * height * channels * 4 / 2**20,
                    "factor_mib": (9 * channels + 1) ** 2 * 4 / 2**20,
                }
            )
    print(
        "| input | A from | ms/call (b=32) | peak RSS above the layer call (MiB, b=256) "
        "| largest tensor (MiB, b=256) | input (MiB, b=256) | A (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['variant']} | {r['ms']:.1f} | {r['extra_mib']:.0f} "
            f"| {r['largest_mib']:.1f} | {r['input_mib']:.1f} | {r['factor_mib']:.1f} |"
        )
    return rows


def _step_timer(build: Callable[[], Any], optimizer: Callable[[Any], Any], batch: int) -> Callable:
    import keras
    import numpy as np

    model = build()
    model.compile(
        optimizer=optimizer(model),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    shape = model.input_shape[1:]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, *shape)).astype("float32")
    y = rng.integers(0, 10, size=batch)
    for _ in range(3):
        model.train_on_batch(x, y)  # trace, compile, first inversion

    def steps(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            model.train_on_batch(x, y)
        return (time.perf_counter() - start) / n

    return steps


def _interleaved(timers: dict[str, Callable], rounds: int, steps: int) -> dict[str, float]:
    """Median ms/step of each timer over `rounds` interleaved rounds of `steps` steps."""
    samples: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer(steps))
    return {name: 1e3 * statistics.median(s) for name, s in samples.items()}


def _diagonal_model(unsupported: bool) -> Any:
    import keras

    def wrap(cls: Any) -> Any:
        if not unsupported:
            return cls
        # A subclass overriding `call` is a layer K-FAC does not model: a generic diagonal block.
        return type(f"Opaque{cls.__name__}", (cls,), {"call": lambda self, x: cls.call(self, x)})

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            wrap(keras.layers.Conv2D)(32, 3, padding="same", activation="relu"),
            wrap(keras.layers.SeparableConv2D)(64, 3, strides=2, padding="same", activation="relu"),
            wrap(keras.layers.Conv2D)(64, 3, strides=2, padding="same", activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            wrap(keras.layers.Dense)(10),
        ]
    )


def _kfac(model: Any, **options: Any) -> Any:
    from kfac_dist import Kfac

    return Kfac(model=model, learning_rate=0.01, damping=0.01, invert_every=10, **options)


def diagonal_table(rounds: int = 7, steps: int = 10) -> dict:
    import keras

    results = {}
    for unsupported in (False, True):
        options = (
            {"unsupported_layers": "diagonal"} if unsupported else {"fisher_approx": "diagonal"}
        )
        build = functools.partial(_diagonal_model, unsupported)
        timers = {
            "adam": _step_timer(build, lambda m: keras.optimizers.Adam(1e-3), BATCH),
            "kfac": _step_timer(build, functools.partial(_kfac, **options), BATCH),
            "kfac_no_statistics": _step_timer(
                build, functools.partial(_kfac, cov_update_every=10**9, **options), BATCH
            ),
        }
        name = (
            "generic diagonal (unsupported layers)" if unsupported else 'fisher_approx="diagonal"'
        )
        results[name] = _interleaved(timers, rounds, steps)
    print(
        "| model (b=32, 32x32x3) | Adam ms/step | K-FAC ms/step | ratio "
        "| K-FAC without statistics | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['adam']:.1f} | {r['kfac']:.1f} | {r['kfac'] / r['adam']:.2f} "
            f"| {r['kfac_no_statistics']:.1f} | {r['kfac_no_statistics'] / r['adam']:.2f} |"
        )
    return results


def _convnet() -> Any:
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(2),
            keras.layers.Flatten(),  # 13·13·16 = 2,704 features (+1 bias: A is 2,705²)
            keras.layers.Dense(10),
        ]
    )


def convnet_table(rounds: int = 7, steps: int = 10) -> dict:
    import keras

    timers = {
        "adam": _step_timer(_convnet, lambda m: keras.optimizers.Adam(1e-3), BATCH),
        "kfac": _step_timer(_convnet, _kfac, BATCH),
    }
    r = _interleaved(timers, rounds, steps)
    print("| model (b=32) | Adam ms/step | K-FAC ms/step | ratio |")
    print("|---|---|---|---|")
    print(
        f"| convnet, Flatten → Dense(2,705 inputs) | {r['adam']:.1f} | {r['kfac']:.1f} "
        f"| {r['kfac'] / r['adam']:.2f} |"
    )
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", default=["layer", "diagonal", "convnet"])
    parser.add_argument("--layer-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layer_memory:
        print(json.dumps(_layer_memory(*json.loads(args.layer_memory))))
        return
    tables: dict[str, Callable[[], Any]] = {
        "layer": layer_table,
        "diagonal": diagonal_table,
        "convnet": convnet_table,
    }
    for part in args.parts:
        tables[part]()


if __name__ == "__main__":
    main()
