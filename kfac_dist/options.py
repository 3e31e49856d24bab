"""Every option's vocabulary, defined once: the strings `Kfac` and the commands accept.

Each option is a string enum, so a member equals the plain string a user
passes (`InverseMethod.EIGEN == "eigen"`). Pure Python: the placement
planner and the commands' parsers read it without TensorFlow.
"""

from __future__ import annotations

import enum


class Option(str, enum.Enum):
    """A string option: compares, hashes and formats as its value."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)


class EstimationMode(Option):
    """How the Fisher is estimated: sampled targets, the data's labels, or every output."""

    SAMPLED = "sampled"
    EMPIRICAL = "empirical"
    EXACT = "exact"


class Approximation(Option):
    """A curvature block's structure (`fisher_approx`)."""

    KRON = "kron"
    DIAGONAL = "diagonal"
    FULL = "full"


class InverseMethod(Option):
    """Factored Tikhonov damping with Cholesky inverses, or exact damping through eigenbases."""

    CHOLESKY = "cholesky"
    EIGEN = "eigen"


class BuiltinPlacement(Option):
    """The built-in policies that choose which replica inverts each factor."""

    ROUND_ROBIN = "round_robin"
    BALANCED = "balanced"
    REPLICATED = "replicated"


class SharingMethod(Option):
    """How owners' inverses reach every replica."""

    AUTO = "auto"
    ALL_REDUCE = "all_reduce"
    ALL_GATHER = "all_gather"
    BROADCAST = "broadcast"


class FactorSync(Option):
    """When replicas average their factor statistics."""

    LAZY = "lazy"
    EVERY_UPDATE = "every_update"


class MomentumType(Option):
    """Fixed learning rate and momentum, or the quadratic model's (α, μ)."""

    REGULAR = "regular"
    QMODEL = "qmodel"
    QMODEL_FIXED_MU = "qmodel_fixedmu"


class KroneckerSharing(Option):
    """How a Kronecker block takes the positions a layer shares its weights over (`kron_sharing`).

    "expand": every position (sequence step, head-shared row) is one more
    example; "reduce": each example's inputs are averaged and its output
    gradients summed over its positions first (Eschenhagen et al. 2023).
    """

    EXPAND = "expand"
    REDUCE = "reduce"


class UnsupportedLayers(Option):
    """What to do with a trainable layer no block kind covers."""

    ERROR = "error"
    DIAGONAL = "diagonal"


SAMPLED, EMPIRICAL, EXACT = EstimationMode
ESTIMATION_MODES = EstimationMode.values()
KRON, DIAGONAL, FULL = Approximation
APPROXIMATIONS = Approximation.values()
CHOLESKY, EIGEN = InverseMethod
INVERSE_METHODS = InverseMethod.values()
PLACEMENT_POLICIES = BuiltinPlacement.values()
SHARING_METHODS = SharingMethod.values()
LAZY, EVERY_UPDATE = FactorSync
FACTOR_SYNC_MODES = FactorSync.values()
REGULAR, QMODEL, QMODEL_FIXED_MU = MomentumType
MOMENTUM_TYPES = MomentumType.values()
EXPAND, REDUCE = KroneckerSharing
KRON_SHARINGS = KroneckerSharing.values()
#: `max_factor_dim`'s default: a matrix factor larger than this is kept as
#: diagonal blocks no larger (chosen by measurement, BENCHMARKS.md).
DEFAULT_MAX_FACTOR_DIM: int | None = 2048
UNSUPPORTED_LAYER_POLICIES = UnsupportedLayers.values()
