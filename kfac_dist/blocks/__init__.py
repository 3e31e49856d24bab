"""Curvature blocks: approximations, inverse methods and layer kinds, one module each.

`approximations/` holds the structures of a block's Fisher (Kronecker,
diagonal, full) and `inverse_methods/` the ways a factor is inverted
(Cholesky, eigen), each on an abstract base with a registry; the layer
kinds (`dense`, `einsum_dense`, `conv`, `conv_transpose`, `grouped_conv`,
`depthwise`, `separable`, `embedding`, `reversible_embedding`,
`position_embedding`, `scale_shift`, `recurrent`, and
`diagonal` for arbitrary variables) say what they record and how their
variables map onto a block. `Block` is the unit the rest of the package sees.
"""

from kfac_dist.blocks.approximations import (
    APPROXIMATION_OF,
    Approximation,
    Diagonal,
    Full,
    Kronecker,
    KronPart,
    LayerKind,
    PerExample,
)
from kfac_dist.blocks.base import (
    APPROXIMATIONS,
    CHOLESKY,
    DIAGONAL,
    EIGEN,
    FULL,
    INVERSE_METHODS,
    KRON,
    Block,
    factor_dampings,
    invert_factors,
)
from kfac_dist.blocks.conv import ConvBlock
from kfac_dist.blocks.conv_transpose import ConvTransposeBlock
from kfac_dist.blocks.dense import DenseBlock
from kfac_dist.blocks.depthwise import DepthwiseConvBlock
from kfac_dist.blocks.diagonal import GenericDiagonalBlock
from kfac_dist.blocks.einsum_dense import EinsumDenseBlock
from kfac_dist.blocks.embedding import EmbeddingBlock
from kfac_dist.blocks.grouped_conv import GroupedConvBlock, GroupedPatchBlock, conv_block
from kfac_dist.blocks.inverse_methods import (
    INVERSE_METHOD_OF,
    Cholesky,
    Eigen,
    InverseMethod,
    inverse_method,
)
from kfac_dist.blocks.position_embedding import PositionEmbeddingBlock
from kfac_dist.blocks.records import Record
from kfac_dist.blocks.recurrent import KroneckerPair, RecurrentBlock
from kfac_dist.blocks.reversible_embedding import ReversibleEmbeddingBlock
from kfac_dist.blocks.scale_shift import ScaleShiftBlock
from kfac_dist.blocks.separable import SeparableConvBlock

__all__ = [
    "APPROXIMATIONS",
    "APPROXIMATION_OF",
    "Approximation",
    "Block",
    "CHOLESKY",
    "Cholesky",
    "ConvBlock",
    "ConvTransposeBlock",
    "DIAGONAL",
    "DenseBlock",
    "DepthwiseConvBlock",
    "Diagonal",
    "EIGEN",
    "Eigen",
    "EinsumDenseBlock",
    "EmbeddingBlock",
    "FULL",
    "Full",
    "GenericDiagonalBlock",
    "GroupedConvBlock",
    "GroupedPatchBlock",
    "INVERSE_METHODS",
    "INVERSE_METHOD_OF",
    "InverseMethod",
    "KRON",
    "KronPart",
    "Kronecker",
    "KroneckerPair",
    "LayerKind",
    "PerExample",
    "PositionEmbeddingBlock",
    "Record",
    "RecurrentBlock",
    "ReversibleEmbeddingBlock",
    "ScaleShiftBlock",
    "SeparableConvBlock",
    "conv_block",
    "factor_dampings",
    "invert_factors",
    "inverse_method",
]
