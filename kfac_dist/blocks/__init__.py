"""Curvature blocks, one module per block kind."""

from kfac_dist.blocks.base import (
    APPROXIMATIONS,
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    INVERSE_METHODS,
    KRON,
    Block,
    Record,
    factor_dampings,
    invert_factors,
)
from kfac_dist.blocks.conv import ConvBlock
from kfac_dist.blocks.dense import DenseBlock
from kfac_dist.blocks.diagonal import GenericDiagonalBlock
from kfac_dist.blocks.embedding import EmbeddingBlock
from kfac_dist.blocks.scale_shift import ScaleShiftBlock

__all__ = [
    "APPROXIMATIONS",
    "CHOLESKY",
    "DIAGONAL",
    "EIGEN",
    "FULL",
    "INVERSE_METHODS",
    "KRON",
    "Block",
    "ConvBlock",
    "DenseBlock",
    "EmbeddingBlock",
    "GenericDiagonalBlock",
    "Record",
    "ScaleShiftBlock",
    "factor_dampings",
    "invert_factors",
]
