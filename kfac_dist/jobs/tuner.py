"""The placement tuner: every policy on a model's factors, a recommendation, a benchmark.

    python scripts/tune_placement.py convnet --replicas 4
    python scripts/tune_placement.py ResNet50 --replicas 8 --measure
    python scripts/tune_placement.py ResNet50 --input-shape 160,160,3 --replicas 64 --json
    python scripts/tune_placement.py path/to/model.keras --replicas 2

Loading a model and reading its factors needs Keras (imported when called);
comparing, recommending and benchmarking plans is pure Python, and so is
this module's import: the command's `--help` answers before TensorFlow
loads. `scripts/tune_placement.py` and the console script
`kfac-tune-placement` call `main`; the placement benchmark's command is
kfac_dist/jobs/placement_benchmark.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from kfac_dist.options import DEFAULT_MAX_FACTOR_DIM, PLACEMENT_POLICIES
from kfac_dist.placement.cost import CostModel, FlopCostModel, MeasuredCostModel
from kfac_dist.placement.plan import PlacementPlan, make_plan
from kfac_dist.placement.report import (
    Sharing,
    factor_sync_bytes,
    format_bytes,
    format_placement_table,
    inverse_sharing,
    plan_to_dict,
)
from kfac_dist.placement.units import InversionUnit, check_method

if TYPE_CHECKING:
    import keras

# The order is the preference between policies of equal max share: round-robin
# needs no costs, so it plans the same on every machine.
TUNED_POLICIES = PLACEMENT_POLICIES
EXAMPLE_MODELS = ("autoencoder", "convnet")
BENCHMARK_REPLICAS = (2, 4, 8, 64, 256)
BENCHMARK_HEADING = "## Inverse placement on ResNet-50 shapes"


# --- models ---------------------------------------------------------------------
def load_model(spec: str, input_shape: Sequence[int] | None = None) -> keras.Model:
    """A Keras model from an example name, a `keras.applications` name, or a `.keras` path.

    Example names: `"autoencoder"`, `"convnet"` (`kfac_dist.jobs.examples`).
    Applications (e.g. `"ResNet50"`) are built with `weights=None`, at
    `input_shape` when given. Saved models load without their optimizer.
    """
    import keras

    if spec in EXAMPLE_MODELS:
        if input_shape is not None:
            raise ValueError(f"input_shape applies to keras.applications models, not {spec!r}.")
        from kfac_dist.jobs.examples import autoencoder, convnet

        builders: dict[str, Callable[[], keras.Model]] = {
            "autoencoder": autoencoder.build_autoencoder,
            "convnet": convnet.build_convnet,
        }
        return builders[spec]()
    if spec.endswith(".keras") or os.path.exists(spec):
        if not os.path.isfile(spec):
            raise ValueError(f"No saved model at {spec!r}.")
        return keras.saving.load_model(spec, compile=False)
    application = getattr(keras.applications, spec, None)
    if isinstance(application, type) or not callable(application):
        raise ValueError(
            f"Unknown model {spec!r}: expected one of {EXAMPLE_MODELS}, a keras.applications "
            "name such as 'ResNet50', or the path of a saved .keras model."
        )
    build: Callable[..., keras.Model] = application
    kwargs = {} if input_shape is None else {"input_shape": tuple(input_shape)}
    return build(weights=None, **kwargs)


def model_units(
    model: keras.Model,
    unsupported_layers: str = "error",
    max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
) -> list[InversionUnit]:
    """The factors `Kfac` would invert for `model`, block by block (A then G).

    Registered as `Kfac` registers them: BatchNormalization is a diagonal
    block; `unsupported_layers="diagonal"` gives other layers one as well;
    a factor larger than `max_factor_dim` is one unit of its diagonal
    blocks (Kfac's default bound unless given; None keeps every factor whole).
    """
    from kfac_dist import curvature, registration

    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built: call it on data or give it an Input.")
    blocks = registration.collect_blocks(
        model, unsupported_layers=unsupported_layers, max_factor_dim=max_factor_dim
    )
    return curvature.inversion_units(blocks)


# --- tuning -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Tuning:
    """Each policy's plan for one set of units and replica count, and the pick.

    Byte counts are per replica: `bytes_per_factor_sync` is the same for
    every policy; `sharing` has one entry per plan.
    `Kfac` always prices its plan by flops, so `kfac_max_share` is the max
    share, under this tuning's costs, of the plan `Kfac` makes with the
    recommended policy: with measured costs it can exceed the recommended
    plan's own.
    """

    plans: tuple[PlacementPlan, ...]
    recommended: str
    inverse_method: str
    inverse_sharing: str
    cost_model: str
    bytes_per_factor_sync: int
    sharing: tuple[Sharing, ...]
    kfac_max_share: float

    @property
    def recommended_plan(self) -> PlacementPlan:
        return next(plan for plan in self.plans if plan.policy_name == self.recommended)

    def kfac_argument(self) -> str:
        """The `Kfac(...)` arguments that use the recommended policy."""
        argument = f'placement="{self.recommended}"'
        if self.inverse_method != "cholesky":
            argument += f', inverse_method="{self.inverse_method}"'
        if self.inverse_sharing != "auto":
            argument += f', inverse_sharing="{self.inverse_sharing}"'
        return argument


def tune(
    units: Sequence[InversionUnit],
    num_replicas: int,
    *,
    inverse_method: str = "cholesky",
    cost_model: CostModel | None = None,
    sharing: str = "auto",
    itemsize: int = 4,
) -> Tuning:
    """Plans `units` on `num_replicas` with every built-in policy and recommends one.

    `cost_model` defaults to `FlopCostModel(inverse_method)`, the one `Kfac`
    plans with; a `MeasuredCostModel` prices with this machine's timings.
    `sharing` is `Kfac`'s `inverse_sharing`, which sets the sharing bytes.
    """
    check_method(inverse_method)
    kfac_cost_model = FlopCostModel(inverse_method)
    cost_model = cost_model if cost_model is not None else kfac_cost_model
    plans = tuple(make_plan(units, num_replicas, name, cost_model) for name in TUNED_POLICIES)
    recommended = recommend(plans)
    chosen = next(plan for plan in plans if plan.policy_name == recommended)
    kfac_plan = make_plan(units, num_replicas, recommended, kfac_cost_model)
    return Tuning(
        plans=plans,
        recommended=recommended,
        inverse_method=inverse_method,
        inverse_sharing=sharing,
        cost_model=repr(cost_model),
        bytes_per_factor_sync=factor_sync_bytes(units, itemsize),
        sharing=tuple(inverse_sharing(plan, inverse_method, itemsize, sharing) for plan in plans),
        kfac_max_share=dataclasses.replace(chosen, owners=kfac_plan.owners).max_share,
    )


def recommend(plans: Sequence[PlacementPlan]) -> str:
    """The policy of the plan with the lowest max share; ties go to round-robin.

    Shares within 1e-9 (relative) of each other tie, so that float sums of
    the same costs in another order do not decide.
    """
    best = min(plan.max_share for plan in plans)
    tied = [plan.policy_name for plan in plans if math.isclose(plan.max_share, best, rel_tol=1e-9)]
    return min(tied, key=_preference)


def _preference(name: str) -> int:
    return TUNED_POLICIES.index(name) if name in TUNED_POLICIES else len(TUNED_POLICIES)


def format_tuning(tuning: Tuning, *, title: str = "", names_width: int = 60) -> str:
    """One placement table per policy, then the recommendation and its `Kfac` argument."""
    plans = tuning.plans
    lines = [title] if title else []
    lines.append(
        f"{len(plans[0].units)} units on {plans[0].num_replicas} replicas, "
        f"inverse_method={tuning.inverse_method!r}, inverse_sharing={tuning.inverse_sharing!r}, "
        f"costs from {tuning.cost_model}"
    )
    for plan, sharing in zip(plans, tuning.sharing, strict=True):
        table = format_placement_table(
            plan,
            bytes_per_factor_sync=tuning.bytes_per_factor_sync,
            bytes_per_inverse_share=sharing.sent,
            sharing_method=sharing.method,
            sharing_collectives=sharing.collectives,
            names_width=names_width,
        )
        lines += ["", f"== {plan.policy_name} ==", table]
    chosen = tuning.recommended_plan
    lines += [
        "",
        f"recommended: {tuning.recommended} (max share {100 * chosen.max_share:.1f}%, "
        f"lower bound {100 * chosen.lower_bound_share:.1f}%)",
        f"use: Kfac(..., {tuning.kfac_argument()})",
    ]
    if not math.isclose(tuning.kfac_max_share, chosen.max_share, rel_tol=1e-9):
        lines.append(
            f"note: Kfac prices its plan by flops; under these costs that plan's max share "
            f"is {100 * tuning.kfac_max_share:.1f}%"
        )
    return "\n".join(lines)


def tuning_to_dict(tuning: Tuning) -> dict:
    """The tuning as JSON-ready data: every plan, the pick and its `Kfac` argument."""
    return {
        "inverse_method": tuning.inverse_method,
        "inverse_sharing": tuning.inverse_sharing,
        "cost_model": tuning.cost_model,
        "plans": [
            {
                **plan_to_dict(
                    plan,
                    bytes_per_factor_sync=tuning.bytes_per_factor_sync,
                    bytes_per_inverse_share=sharing.sent,
                    sharing_method=sharing.method,
                    sharing_collectives=sharing.collectives,
                ),
                "sharing_buffer_bytes": sharing.buffer,
            }
            for plan, sharing in zip(tuning.plans, tuning.sharing, strict=True)
        ],
        "recommended": tuning.recommended,
        "kfac_argument": tuning.kfac_argument(),
        "kfac_max_share": tuning.kfac_max_share,
    }


# --- benchmark ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PlacementBenchmark:
    """Every policy's max share against the lower bound, at several replica counts.

    `tunings` has one entry per replica count; `parity_split` counts, for
    round-robin on 2 replicas, the A and G factors on even and odd replicas.
    """

    model_name: str
    units: tuple[InversionUnit, ...]
    tunings: tuple[Tuning, ...]
    parity_split: dict[str, dict[str, int]]

    @property
    def largest_unit(self) -> tuple[InversionUnit, float]:
        """The costliest unit and its share of the total cost."""
        plan = self.tunings[0].plans[0]
        i = max(range(len(plan.costs)), key=plan.costs.__getitem__)
        return plan.units[i], plan.costs[i] / plan.total_cost

    def within(self, policy: str, tolerance: float) -> bool:
        """Whether `policy` is within `tolerance` (relative) of the bound at every N."""
        return all(
            plan.max_share <= (1 + tolerance) * plan.lower_bound_share
            for tuning in self.tunings
            for plan in tuning.plans
            if plan.policy_name == policy
        )


def benchmark_placement(
    units: Sequence[InversionUnit],
    *,
    model_name: str,
    replica_counts: Sequence[int] = BENCHMARK_REPLICAS,
    inverse_method: str = "cholesky",
    cost_model: CostModel | None = None,
) -> PlacementBenchmark:
    """Tunes `units` at each replica count and splits round-robin's A/G factors by parity."""
    tunings = tuple(
        tune(units, n, inverse_method=inverse_method, cost_model=cost_model) for n in replica_counts
    )
    return PlacementBenchmark(
        model_name=model_name,
        units=tuple(units),
        tunings=tunings,
        parity_split=factor_parity_split(make_plan(units, 2, "round_robin")),
    )


def factor_parity_split(plan: PlacementPlan) -> dict[str, dict[str, int]]:
    """How many A and how many G factors the even and the odd replicas own.

    Kronecker blocks list A then G, so owners `k % N` with N even would put
    every A factor on an even replica and every G factor on an odd one.
    """
    split = {kind: {"even": 0, "odd": 0} for kind in ("A", "G")}
    for unit, owner in zip(plan.units, plan.owners, strict=True):
        kind = unit.name.rsplit("/", 1)[-1]
        if kind in split and owner is not None:
            split[kind]["odd" if owner % 2 else "even"] += 1
    return split


def benchmark_markdown(benchmark: PlacementBenchmark) -> str:
    """The benchmark as a markdown section under `BENCHMARK_HEADING`."""
    units = benchmark.units
    largest, largest_share = benchmark.largest_unit
    matrices = sum(unit.kind == "matrix" for unit in units)
    first = benchmark.tunings[0]
    split = benchmark.parity_split
    lines = [
        BENCHMARK_HEADING,
        "",
        "Written by `python scripts/benchmark_placement.py` (placement only, nothing trained). "
        f"Units: the {len(units)} factors K-FAC inverts for {benchmark.model_name} "
        f"({matrices} matrix factors, {len(units) - matrices} diagonal ones), "
        f"priced by `{first.cost_model}`. The largest, `{largest.name}` (n = {largest.dim}), "
        f"is {100 * largest_share:.1f}% of an inverse update's cost.",
        "",
        "Max share: the busiest replica's share of that cost, the inverse update's span. "
        "Bound: max(1/N, largest factor's share), which no placement can beat.",
        "",
        "| replicas | bound | " + " | ".join(TUNED_POLICIES) + " | balanced / bound |",
        "|---:|---:|" + "---:|" * len(TUNED_POLICIES) + "---:|",
    ]
    for tuning in benchmark.tunings:
        plans = {plan.policy_name: plan for plan in tuning.plans}
        bound = tuning.plans[0].lower_bound_share
        shares = " | ".join(f"{100 * plans[name].max_share:.1f}%" for name in TUNED_POLICIES)
        ratio = plans["balanced"].max_share / bound
        lines.append(
            f"| {tuning.plans[0].num_replicas} | {100 * bound:.1f}% | {shares} | {ratio:.3f} |"
        )
    lines += [
        "",
        f"Round-robin on 2 replicas: A factors {split['A']['even']} on the even replica, "
        f"{split['A']['odd']} on the odd one; G factors {split['G']['even']} even, "
        f"{split['G']['odd']} odd.",
        "",
        "Bytes per replica, float32: the factor sync hands in "
        f"{format_bytes(first.bytes_per_factor_sync)} (a sum all-reduce, at every N). "
        "Sharing the balanced plan's inverses on each inverse update (nothing with "
        "replicated), handed in and the transient buffer held; `auto` is what "
        '`Kfac(inverse_sharing="auto")` picks:',
        "",
        "| replicas | auto | all_reduce: handed in = buffer | all_gather: handed in | "
        "all_gather: buffer |",
        "|---:|:---|---:|---:|---:|",
    ]
    for tuning in benchmark.tunings:
        plan = next(plan for plan in tuning.plans if plan.policy_name == "balanced")
        auto, reduce, gather = (
            inverse_sharing(plan, tuning.inverse_method, sharing=sharing)
            for sharing in ("auto", "all_reduce", "all_gather")
        )
        lines.append(
            f"| {plan.num_replicas} | {auto.method} | {format_bytes(reduce.sent)} | "
            f"{format_bytes(gather.sent)} | {format_bytes(gather.buffer)} |"
        )
    return "\n".join(lines) + "\n"


def write_markdown_section(path: str, section: str) -> None:
    """Puts `section` (starting with its `## ` heading) into the markdown file at `path`.

    The file is read right before it is written, and only the section under
    the same heading (up to the next heading of level 1 or 2) is replaced, or
    the section is appended: others edit the rest of the file.
    """
    heading = section.splitlines()[0]
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = text.splitlines(keepends=True)
    headings = _top_headings(lines)
    start = next((i for i in headings if lines[i].rstrip() == heading), None)
    if start is None:
        before = text.rstrip("\n")
        new_text = (before + "\n\n" if before else "") + section
    else:
        end = next((i for i in headings if i > start), len(lines))
        after = "".join(lines[end:])
        new_text = "".join(lines[:start]) + section + ("\n" + after if after else "")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new_text)


def _top_headings(lines: Sequence[str]) -> list[int]:
    """Indices of `# ` and `## ` headings, skipping fenced code (where `#` is a comment)."""
    headings, fenced = [], False
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith(("# ", "## ")):
            headings.append(i)
    return headings


# --- the command line -------------------------------------------------------------------
DESCRIPTION = (
    "Command line of the placement tuner: every policy on a model's factors, and the one to use."
)


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(","))


def _bound(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The tuner's command line (prog: the name it was started by)."""
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument(
        "model",
        help="an example name (autoencoder, convnet), a keras.applications name "
        "(ResNet50, built with weights=None) or the path of a saved .keras model",
    )
    parser.add_argument("--replicas", "-n", type=int, required=True, help="replicas in sync")
    parser.add_argument(
        "--input-shape",
        type=_shape,
        help="input shape of a keras.applications model, e.g. 224,224,3",
    )
    parser.add_argument("--inverse-method", choices=("cholesky", "eigen"), default="cholesky")
    parser.add_argument(
        "--inverse-sharing",
        choices=("auto", "all_reduce", "all_gather"),
        default="auto",
        help="Kfac's inverse_sharing, which sets the bytes of sharing the inverses",
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="price each factor size by timing real inversions on this machine "
        "(MeasuredCostModel) instead of counting flops",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per size")
    parser.add_argument(
        "--unsupported-layers",
        choices=("error", "diagonal"),
        default="error",
        help="what to do with trainable layers K-FAC has no block for",
    )
    parser.add_argument(
        "--max-factor-dim",
        type=_bound,
        default=DEFAULT_MAX_FACTOR_DIM,
        help="Kfac's max_factor_dim: larger factors are planned as their diagonal blocks "
        f"(default {DEFAULT_MAX_FACTOR_DIM}, Kfac's; 'none' keeps every factor whole)",
    )
    parser.add_argument("--names-width", type=int, default=60)
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Tunes the placement of a model's factors and prints the tables (or JSON); status 0."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before Keras loads TensorFlow
    model = load_model(args.model, args.input_shape)
    units = model_units(model, args.unsupported_layers, args.max_factor_dim)
    cost_model = (
        MeasuredCostModel(args.inverse_method, repeats=args.repeats) if args.measure else None
    )
    tuning = tune(
        units,
        args.replicas,
        inverse_method=args.inverse_method,
        cost_model=cost_model,
        sharing=args.inverse_sharing,
    )
    if args.json:
        print(json.dumps({"model": model.name, **tuning_to_dict(tuning)}, indent=1))
    else:
        title = f"model {model.name}: {args.replicas} replicas"
        print(format_tuning(tuning, title=title, names_width=args.names_width))
    return 0


if __name__ == "__main__":
    sys.exit(main())
