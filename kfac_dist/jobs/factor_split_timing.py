"""The timing of `factor_split_benchmark` (TensorFlow loads here, after the flags)."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from kfac_dist import linalg
from kfac_dist.blocks import inverse_method, invert_factors
from kfac_dist.blocks.approximations.kronecker import _solve_split

DAMPING = 1e-3


def random_spd(n: int, rng: np.random.Generator) -> np.ndarray:
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
