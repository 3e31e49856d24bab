"""Times one large Kronecker pair kept whole against its diagonal blocks (`max_factor_dim`).

    python scripts/benchmark_factor_split.py
    python scripts/benchmark_factor_split.py --dim 4608 --output-dim 512 --bounds none,2048,1024,512

The pair is ResNet-50's largest: A 4608×4608 (a 3×3 convolution over 512
channels, bias left out so that every bound divides it) and G 512×512. For
each bound it times, with the library's own ops in one `tf.function` each,
the inversion of A's blocks and G (Cholesky with its damping and
conditioning check, or eigh) and the preconditioning of a (4608, 512)
gradient matrix, float32; the minimum of `--repeats` calls after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kfac_dist import linalg  # noqa: E402
from kfac_dist.blocks import CHOLESKY, EIGEN, inverse_method, invert_factors  # noqa: E402
from kfac_dist.blocks.approximations.kronecker import _solve_split  # noqa: E402

DAMPING = 1e-3


def _spd(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((2 * n, n)).astype(np.float32)
    return x.T @ x / (2 * n)


def _best(fn: Callable[[], object], repeats: int) -> float:
    def once() -> float:
        start = time.perf_counter()
        out = fn()
        tf.nest.map_structure(lambda t: t.numpy(), out)
        return time.perf_counter() - start

    once()
    return min(once() for _ in range(repeats))


def time_bound(
    a: np.ndarray, g: np.ndarray, bound: int | None, method: str, repeats: int
) -> tuple[float, float]:
    """(inversion seconds, preconditioning seconds) of the pair under `bound`."""
    split = linalg.split_of(len(a), bound)
    a_factor = linalg.diagonal_blocks(tf.constant(a), split)
    g_factor = tf.constant(g)
    groups = [None if split is None else split.members, None]
    members = 1 if split is None else split.members
    dampings = tf.fill([members + 1], tf.constant(DAMPING, tf.float32))
    matrix = tf.constant(np.random.default_rng(1).standard_normal((len(a), len(g))), tf.float32)
    inverse = inverse_method(method)

    @tf.function
    def invert() -> list[list[tf.Tensor]]:
        return invert_factors([a_factor, g_factor], dampings, method, groups)[0]

    payloads = invert()

    @tf.function
    def precondition() -> tf.Tensor:
        if split is None:
            return inverse.solve_kronecker(payloads[0], payloads[1], matrix, DAMPING)
        return _solve_split(inverse, payloads[0], payloads[1], matrix, (split, None), DAMPING)

    return _best(invert, repeats), _best(precondition, repeats)


def _bounds(text: str) -> list[int | None]:
    return [None if b.lower() == "none" else int(b) for b in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4608)
    parser.add_argument("--output-dim", type=int, default=512)
    parser.add_argument("--bounds", type=_bounds, default=_bounds("none,2048,1024,512,256"))
    parser.add_argument("--methods", default=f"{CHOLESKY},{EIGEN}")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    a, g = _spd(args.dim, rng), _spd(args.output_dim, rng)
    print(f"A {args.dim}x{args.dim}, G {args.output_dim}x{args.output_dim}, float32, seconds")
    print("| method | max_factor_dim | blocks | inversion | preconditioning | total |")
    print("|:---|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        for bound in args.bounds:
            split = linalg.split_of(args.dim, bound)
            blocks = "1" if split is None else f"{split.members}×{split.size}"
            inv, pre = time_bound(a, g, bound, method, args.repeats)
            print(f"| {method} | {bound} | {blocks} | {inv:.3f} | {pre:.4f} | {inv + pre:.3f} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
