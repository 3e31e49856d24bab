"""The curvature approximations, one module each, and their registry (`fisher_approx` → class)."""

from __future__ import annotations

from kfac_dist.blocks.approximations.base import Approximation, KronPart, LayerKind, PerExample
from kfac_dist.blocks.approximations.diagonal import Diagonal
from kfac_dist.blocks.approximations.full import Full
from kfac_dist.blocks.approximations.kronecker import Kronecker

#: Every approximation, by the `fisher_approx` option that selects it; the first is the default.
APPROXIMATION_OF: dict[str, type[Approximation]] = {
    cls.name: cls for cls in (Kronecker, Diagonal, Full)
}

__all__ = [
    "APPROXIMATION_OF",
    "Approximation",
    "Diagonal",
    "Full",
    "KronPart",
    "Kronecker",
    "LayerKind",
    "PerExample",
]
