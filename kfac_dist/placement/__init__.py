"""Placement of K-FAC inverses: which replica inverts each factor, at what cost.

Pure Python and NumPy (TensorFlow only inside `MeasuredCostModel`), so that
plans are deterministic and testable without a device.
"""

from kfac_dist.placement.cost import (
    EIGEN_FLOP_FACTOR,
    CostModel,
    FlopCostModel,
    MeasuredCostModel,
)
from kfac_dist.placement.plan import PlacementPlan, make_plan
from kfac_dist.placement.policies import (
    BUILTIN_POLICIES,
    Balanced,
    PlacementPolicy,
    Replicated,
    RoundRobin,
    assign_owners,
    resolve_policy,
)
from kfac_dist.placement.report import (
    format_bytes,
    format_placement_table,
    plan_to_dict,
)
from kfac_dist.placement.units import (
    INVERSE_METHODS,
    UNIT_KINDS,
    InversionUnit,
    check_method,
)

__all__ = [
    "BUILTIN_POLICIES",
    "EIGEN_FLOP_FACTOR",
    "INVERSE_METHODS",
    "UNIT_KINDS",
    "Balanced",
    "CostModel",
    "FlopCostModel",
    "InversionUnit",
    "MeasuredCostModel",
    "PlacementPlan",
    "PlacementPolicy",
    "Replicated",
    "RoundRobin",
    "assign_owners",
    "check_method",
    "format_bytes",
    "format_placement_table",
    "make_plan",
    "plan_to_dict",
    "resolve_policy",
]
