"""Placement of K-FAC inverses: which replica inverts each factor, at what cost.

Pure Python and NumPy (TensorFlow only inside `MeasuredCostModel`), so that
plans are deterministic and testable without a device, and importing this
package loads neither TensorFlow nor Keras. The tuner that measures models
is a job: `kfac_dist.jobs.tuner`.
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
    SHARING_METHODS,
    ReplicaMemory,
    Sharing,
    factor_sync_bytes,
    format_bytes,
    format_placement_table,
    inverse_sharing,
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
    "SHARING_METHODS",
    "UNIT_KINDS",
    "Balanced",
    "CostModel",
    "FlopCostModel",
    "InversionUnit",
    "MeasuredCostModel",
    "PlacementPlan",
    "PlacementPolicy",
    "ReplicaMemory",
    "Replicated",
    "RoundRobin",
    "Sharing",
    "assign_owners",
    "check_method",
    "factor_sync_bytes",
    "format_bytes",
    "format_placement_table",
    "inverse_sharing",
    "make_plan",
    "plan_to_dict",
    "resolve_policy",
]
