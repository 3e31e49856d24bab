"""Cost models: the estimated price of inverting one unit, for placement."""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from kfac_dist.placement.units import InversionUnit, check_method

# A symmetric eigendecomposition with eigenvectors costs several times a
# Cholesky-based inverse (about n^3 flops: n^3/3 to factor, n^3/3 to invert the
# triangle, n^3/3 to multiply); Golub & Van Loan (Matrix Computations, §8.3)
# count 4n^3/3 for the tridiagonal reduction alone and ~9n^3 with QR iterations.
# tf.linalg.eigh measured 3.5-4.4x slower than cholesky + cholesky_solve for
# n = 128..1024 (TF 2.21, 2 CPU cores), hence 4.
EIGEN_FLOP_FACTOR = 4.0


class CostModel(Protocol):
    """Maps an inversion unit to its estimated cost (any unit, used relatively)."""

    def __call__(self, unit: InversionUnit) -> float: ...


class FlopCostModel:
    """Flop estimate: `n**3` per matrix unit (x4 in eigen mode), `n` per diagonal.

    Only ratios between units matter to placement, so constant factors common
    to every matrix unit are dropped. A grouped unit costs `groups` times
    one member.
    """

    def __init__(self, method: str = "cholesky"):
        self.method = check_method(method)

    def __call__(self, unit: InversionUnit) -> float:
        if unit.kind == "diagonal":
            return float(unit.groups * unit.dim)
        factor = EIGEN_FLOP_FACTOR if self.method == "eigen" else 1.0
        return unit.groups * factor * float(unit.dim) ** 3

    def __repr__(self) -> str:
        return f"FlopCostModel(method={self.method!r})"


class MeasuredCostModel:
    """Seconds to invert each unit on this machine, timed with TensorFlow.

    Each distinct `(kind, dim, groups)` is timed once, on first use, on a
    random SPD matrix (or positive vector) under the current device scope, a
    batch of `groups` of them for a grouped unit (as the curvature inverts
    its members: one batched op); later units of the same size reuse the
    time. A warm-up call is excluded and the minimum
    of `repeats` calls is kept, since noise only ever adds time.

    Args:
        method: `"cholesky"` (`tf.linalg.cholesky` + `cholesky_solve` against
            the identity) or `"eigen"` (`tf.linalg.eigh`).
        repeats: timed calls per size, at least 1.
        dtype: dtype of the timed matrices.
        seed: seed of the random test matrices.
    """

    def __init__(
        self,
        method: str = "cholesky",
        repeats: int = 3,
        dtype: str = "float32",
        seed: int = 0,
    ):
        self.method = check_method(method)
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats must be an int >= 1, got {repeats!r}.")
        self.repeats = repeats
        self.dtype = dtype
        self.seed = seed
        self._seconds: dict[tuple[str, int, int], float] = {}

    def __call__(self, unit: InversionUnit) -> float:
        key = (unit.kind, unit.dim, unit.groups)
        if key not in self._seconds:
            self._seconds[key] = self._time(unit.kind, unit.dim, unit.groups)
        return self._seconds[key]

    def _time(self, kind: str, n: int, groups: int = 1) -> float:
        import tensorflow as tf

        rng = np.random.default_rng(self.seed)
        # A unit that is not grouped is timed unbatched, as before groups existed.
        batch = [groups] if groups > 1 else []
        if kind == "diagonal":
            vector = tf.constant(rng.uniform(0.5, 1.5, (*batch, n)), dtype=self.dtype)

            def invert() -> tf.Tensor:
                return tf.math.reciprocal(vector)

        else:
            x = rng.standard_normal((*batch, n, n))
            spd = np.einsum("...ij,...kj->...ik", x, x) / n + np.eye(n)
            matrix = tf.constant(spd, dtype=self.dtype)
            identity = tf.eye(n, batch_shape=batch, dtype=self.dtype)

            def invert() -> tf.Tensor:
                if self.method == "eigen":
                    return tf.linalg.eigh(matrix)[1]
                return tf.linalg.cholesky_solve(tf.linalg.cholesky(matrix), identity)

        def run_once() -> float:
            start = time.perf_counter()
            # Reading one entry back waits for asynchronous devices to finish.
            tf.reshape(invert(), [-1])[:1].numpy()
            return time.perf_counter() - start

        run_once()
        return min(run_once() for _ in range(self.repeats))

    def __repr__(self) -> str:
        return (
            f"MeasuredCostModel(method={self.method!r}, repeats={self.repeats}, "
            f"dtype={self.dtype!r})"
        )
