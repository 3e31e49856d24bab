"""Placement of K-FAC inverses: which replica inverts each factor, at what cost.

Pure Python and NumPy (TensorFlow only inside `MeasuredCostModel`, Keras only
when the tuner loads a model), so that plans are deterministic and testable
without a device.
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
from kfac_dist.placement.tuner import (
    BENCHMARK_HEADING,
    BENCHMARK_REPLICAS,
    TUNED_POLICIES,
    PlacementBenchmark,
    Tuning,
    benchmark_markdown,
    benchmark_placement,
    format_tuning,
    load_model,
    model_units,
    recommend,
    tune,
    tuning_to_dict,
    write_markdown_section,
)
from kfac_dist.placement.units import (
    INVERSE_METHODS,
    UNIT_KINDS,
    InversionUnit,
    check_method,
)

__all__ = [
    "BENCHMARK_HEADING",
    "BENCHMARK_REPLICAS",
    "BUILTIN_POLICIES",
    "EIGEN_FLOP_FACTOR",
    "INVERSE_METHODS",
    "SHARING_METHODS",
    "TUNED_POLICIES",
    "UNIT_KINDS",
    "Balanced",
    "CostModel",
    "FlopCostModel",
    "InversionUnit",
    "MeasuredCostModel",
    "PlacementBenchmark",
    "PlacementPlan",
    "PlacementPolicy",
    "ReplicaMemory",
    "Replicated",
    "RoundRobin",
    "Sharing",
    "Tuning",
    "assign_owners",
    "benchmark_markdown",
    "benchmark_placement",
    "check_method",
    "factor_sync_bytes",
    "format_bytes",
    "format_placement_table",
    "format_tuning",
    "inverse_sharing",
    "load_model",
    "make_plan",
    "model_units",
    "plan_to_dict",
    "recommend",
    "resolve_policy",
    "tune",
    "tuning_to_dict",
    "write_markdown_section",
]
