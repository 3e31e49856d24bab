"""Tests of the placement tuner: loading models, comparing policies, the ResNet-50 benchmark."""

import json
import os
import subprocess
import sys

import keras
import pytest

from kfac_dist.jobs.tuner import (
    BENCHMARK_HEADING,
    BENCHMARK_REPLICAS,
    benchmark_markdown,
    benchmark_placement,
    factor_parity_split,
    format_tuning,
    load_model,
    model_units,
    recommend,
    tune,
    tuning_to_dict,
    write_markdown_section,
)
from kfac_dist.placement import (
    FlopCostModel,
    InversionUnit,
    MeasuredCostModel,
    Sharing,
    make_plan,
)
from tests.paths import ROOT as ROOT_PATH

ROOT = str(ROOT_PATH)
UNITS = [
    InversionUnit("dense/A", "dense", 4),
    InversionUnit("dense/G", "dense", 2),
    InversionUnit("dense_1/A", "dense_1", 5),
    InversionUnit("dense_1/G", "dense_1", 5),
    InversionUnit("bn/diagonal", "bn", 8, "diagonal"),
]
# The convnet example, by hand: 3x3 convs without bias on 1 then 16 channels,
# BatchNormalization (gamma, beta) after each, Dense on the 7*7*32 features.
CONVNET_UNITS = [
    ("conv_0/A", 9, "matrix"),
    ("conv_0/G", 16, "matrix"),
    ("bn_0/diagonal", 32, "diagonal"),
    ("conv_1/A", 144, "matrix"),
    ("conv_1/G", 32, "matrix"),
    ("bn_1/diagonal", 64, "diagonal"),
    ("hidden/A", 7 * 7 * 32 + 1, "matrix"),
    ("hidden/G", 64, "matrix"),
    ("logits/A", 65, "matrix"),
    ("logits/G", 10, "matrix"),
]


def triangle(n):
    return n * (n + 1) // 2


@pytest.fixture(scope="module")
def resnet50_model():
    return load_model("ResNet50")


@pytest.fixture(scope="module")
def resnet50_units(resnet50_model):
    """Every factor kept whole (max_factor_dim=None), as they were before the bound."""
    return model_units(resnet50_model, max_factor_dim=None)


# --- choosing a policy ---------------------------------------------------------------
def test_recommend_picks_the_lowest_max_share():
    tuning = tune(UNITS, 2)
    shares = {plan.policy_name: plan.max_share for plan in tuning.plans}
    assert shares["balanced"] < shares["round_robin"] < shares["replicated"]
    assert tuning.recommended == "balanced"
    assert tuning.kfac_argument() == 'placement="balanced"'


@pytest.mark.parametrize("num_replicas", [1, 5])
def test_recommend_breaks_ties_toward_round_robin(num_replicas):
    # One replica: every policy does everything. Five equal units on five
    # replicas: round-robin and balanced both give each replica one unit.
    units = [InversionUnit(f"b{i}/A", f"b{i}", 3) for i in range(5)]
    plans = [make_plan(units, num_replicas, p) for p in ("replicated", "balanced", "round_robin")]
    assert recommend(plans) == "round_robin"


def test_tune_counts_the_bytes_every_replica_hands_in():
    floats_synced = triangle(4) + triangle(2) + triangle(5) + triangle(5) + 8 + 2
    shared_cholesky = triangle(4) + triangle(2) + triangle(5) + triangle(5) + 8
    shared_eigen = (4 + 16) + (2 + 4) + (5 + 25) + (5 + 25) + 8
    nothing = Sharing(None, 0, 0)
    # On 3 replicas one replica owns more than a third of the payload: the
    # all-gather's buffer (3 x its share) would exceed the all-reduce's.
    cholesky = tune(UNITS, 3)
    assert cholesky.bytes_per_factor_sync == 4 * floats_synced
    reduce = Sharing("all_reduce", 4 * shared_cholesky, 4 * shared_cholesky)
    assert cholesky.sharing == (reduce, reduce, nothing)
    eigen = tune(UNITS, 3, inverse_method="eigen", itemsize=8)
    assert eigen.bytes_per_factor_sync == 8 * floats_synced
    reduce = Sharing("all_reduce", 8 * shared_eigen, 8 * shared_eigen)
    assert eigen.sharing == (reduce, reduce, nothing)
    assert tune(UNITS, 1).sharing == (nothing, nothing, nothing)


def test_tune_sizes_the_all_gather_by_the_largest_replica():
    # Round-robin owners on 3 replicas: dense/A | dense/G, dense_1/G | dense_1/A, bn.
    largest = triangle(5) + 8
    gather = tune(UNITS, 3, sharing="all_gather").sharing[0]
    assert gather == Sharing("all_gather", 4 * largest, 3 * 4 * largest)
    # Four equal payloads on two replicas: no padding, so auto gathers.
    units = [InversionUnit(f"b{i}/A", f"b{i}", 3) for i in range(4)]
    auto = tune(units, 2).sharing[0]
    assert auto == Sharing("all_gather", 4 * 2 * triangle(3), 4 * 4 * triangle(3))
    assert tune(units, 2, sharing="all_reduce").kfac_argument() == (
        'placement="round_robin", inverse_sharing="all_reduce"'
    )
    with pytest.raises(ValueError, match="sharing must be one of"):
        tune(units, 2, sharing="ring")


def test_tune_prices_with_the_flops_of_the_inverse_method_by_default():
    tuning = tune(UNITS, 2, inverse_method="eigen")
    assert tuning.cost_model == "FlopCostModel(method='eigen')"
    assert tuning.plans[0].costs == (4 * 64.0, 4 * 8.0, 4 * 125.0, 4 * 125.0, 8.0)
    assert tuning.kfac_argument() == 'placement="balanced", inverse_method="eigen"'


def test_measured_costs_are_the_timings_of_each_size():
    cost_model = MeasuredCostModel(repeats=1)
    tuning = tune(UNITS, 2, cost_model=cost_model)
    assert tuning.cost_model.startswith("MeasuredCostModel(")
    for plan in tuning.plans:
        assert plan.costs == tuple(cost_model(unit) for unit in UNITS)
        assert all(cost > 0 for cost in plan.costs)
    # Same (kind, dim), same price: dense_1's two factors are both 5x5.
    assert tuning.plans[0].costs[2] == tuning.plans[0].costs[3]


def test_tuning_tells_what_kfacs_flop_priced_plan_costs_under_other_costs():
    # Priced against flops (8/n): Kfac's balanced plan, by n^3, puts the three
    # small units together, which the cost model given here finds the dearest.
    units = [InversionUnit(f"b{n}/A", f"b{n}", n) for n in (8, 4, 2, 1)]
    tuning = tune(units, 2, cost_model=lambda unit: 8.0 / unit.dim)
    assert tuning.recommended == "balanced"
    assert tuning.recommended_plan.max_share == pytest.approx(8 / 15)
    assert tuning.kfac_max_share == pytest.approx(14 / 15)
    assert format_tuning(tuning).splitlines()[-1] == (
        "note: Kfac prices its plan by flops; under these costs that plan's max share is 93.3%"
    )
    assert tune(units, 2).kfac_max_share == tune(units, 2).recommended_plan.max_share


# --- reports ---------------------------------------------------------------------------
def test_format_tuning_prints_a_table_per_policy_and_the_kfac_argument():
    text = format_tuning(tune(UNITS, 2), title="model tiny: 2 replicas", names_width=30)
    lines = text.splitlines()
    assert lines[0] == "model tiny: 2 replicas"
    assert "costs from FlopCostModel(method='cholesky')" in lines[1]
    for policy in ("round_robin", "balanced", "replicated"):
        assert f"== {policy} ==" in lines
        assert f"policy {policy}: 5 units on 2 replicas" in text
    sync = 4 * (triangle(4) + triangle(2) + 2 * triangle(5) + 8 + 2)
    assert text.count(f"factor sync {sync} B per sync") == 3
    assert "inverse sharing 0 B per inverse update\n" in text  # replicated
    assert "per inverse update (all_reduce, 1 collective)" in text
    assert lines[-2].startswith("recommended: balanced (max share ")
    assert lines[-1] == 'use: Kfac(..., placement="balanced")'


def test_tuning_to_dict_survives_json():
    info = json.loads(json.dumps(tuning_to_dict(tune(UNITS, 2))))
    assert [plan["policy"] for plan in info["plans"]] == ["round_robin", "balanced", "replicated"]
    assert info["recommended"] == "balanced"
    assert info["kfac_argument"] == 'placement="balanced"'
    assert info["kfac_max_share"] == pytest.approx(info["plans"][1]["max_share"])
    assert info["plans"][2]["bytes_per_inverse_share"] == 0
    assert info["plans"][0]["sharing_method"] == "all_reduce"
    assert info["plans"][0]["sharing_buffer_bytes"] == info["plans"][0]["bytes_per_inverse_share"]
    assert [u["name"] for u in info["plans"][0]["units"]] == [u.name for u in UNITS]


# --- models ----------------------------------------------------------------------------
def test_model_units_registers_batchnorm_as_a_diagonal_block():
    units = model_units(load_model("convnet"))
    assert [(u.name, u.dim, u.kind) for u in units] == CONVNET_UNITS


def test_load_model_knows_the_autoencoder_example():
    units = model_units(load_model("autoencoder"))
    sizes = [784, 512, 256, 32, 256, 512, 784]
    want = []
    for name, (d_in, d_out) in zip(
        ["encoder_0", "encoder_1", "code", "decoder_0", "decoder_1", "logits"],
        zip(sizes, sizes[1:]),
    ):
        want += [(f"{name}/A", d_in + 1), (f"{name}/G", d_out)]
    assert [(u.name, u.dim) for u in units] == want


def test_load_model_builds_applications_at_the_given_input_shape():
    model = load_model("MobileNetV2", (32, 32, 3))
    assert model.input_shape == (None, 32, 32, 3)
    # Every layer has a structured block (unsupported layers are an error); a
    # depthwise convolution's per-channel pairs are one grouped unit per factor.
    units = model_units(model)
    depthwise = [u for u in units if u.name.endswith("depthwise/A")]
    assert len(depthwise) == 17
    assert {(u.dim, u.kind) for u in depthwise} == {(9, "matrix")}  # 3×3, no bias
    assert max(u.groups for u in depthwise) == 960
    assert all(u.groups == 1 for u in units if "depthwise" not in u.name)


def test_load_model_reads_a_saved_keras_file(tmp_path):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    model.compile(optimizer="sgd", loss="mse")
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    units = model_units(load_model(path))
    assert [(u.name, u.dim) for u in units] == [("head/A", 4), ("head/G", 2)]


@pytest.mark.parametrize(
    "spec, input_shape, match",
    [
        ("NoSuchNet", None, "Unknown model 'NoSuchNet'"),
        ("missing/model.keras", None, "No saved model"),
        ("convnet", (28, 28, 1), "input_shape applies to keras.applications"),
    ],
)
def test_load_model_rejects_what_it_cannot_build(spec, input_shape, match):
    with pytest.raises(ValueError, match=match):
        load_model(spec, input_shape)


# --- the ResNet-50 benchmark -------------------------------------------------------------
def test_one_resnet50_conv_factor_is_about_a_fifth_of_the_cost(resnet50_units):
    benchmark = benchmark_placement(resnet50_units, model_name="ResNet-50")
    unit, share = benchmark.largest_unit
    assert (unit.dim, unit.kind) == (3 * 3 * 512 + 1, "matrix")
    assert 0.20 < share < 0.23


@pytest.mark.parametrize("bound", [2048, 1024, 512])
def test_split_factors_take_the_largest_unit_below_an_eighth_of_resnet50(resnet50_model, bound):
    """Under max_factor_dim each large factor is one unit of its blocks, now under 1/8."""
    units = model_units(resnet50_model, max_factor_dim=bound)
    assert max(u.dim for u in units if u.kind == "matrix") <= bound
    conv5 = next(u for u in units if u.name == "conv5_block1_2_conv/A")
    assert conv5.groups * conv5.dim >= 4609 and conv5.groups == -(-4609 // bound)
    plan = make_plan(units, 8, "balanced", FlopCostModel())
    assert max(plan.costs) / plan.total_cost < 1 / 8
    assert plan.max_share <= 1.01 / 8


@pytest.mark.parametrize("num_replicas", BENCHMARK_REPLICAS)
def test_balanced_is_within_5_percent_of_the_bound_on_resnet50(resnet50_units, num_replicas):
    plan = make_plan(resnet50_units, num_replicas, "balanced", FlopCostModel())
    costs = plan.costs
    bound = max(1 / num_replicas, max(costs) / sum(costs))
    assert plan.max_share <= 1.05 * bound


def test_round_robin_mixes_a_and_g_factors_on_even_and_odd_replicas(resnet50_units):
    split = factor_parity_split(make_plan(resnet50_units, 2, "round_robin"))
    for kind in ("A", "G"):
        assert split[kind]["even"] + split[kind]["odd"] == 54
        assert min(split[kind].values()) >= 54 // 3, split

    # The split sees the failure it guards against: owners k % 2 on A, G pairs.
    class Modulo:
        def assign(self, costs, num_replicas):
            return [k % num_replicas for k in range(len(costs))]

    pairs = [u for u in resnet50_units if u.kind == "matrix"]
    naive = factor_parity_split(make_plan(pairs, 2, Modulo()))
    assert naive == {"A": {"even": 54, "odd": 0}, "G": {"even": 0, "odd": 54}}


def table_rows(lines, header):
    """The rows of the markdown table under `header`, split into stripped cells."""
    start = lines.index(header) + 2
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[start:end]]


def test_benchmark_markdown_has_a_row_per_replica_count(resnet50_units):
    benchmark = benchmark_placement(resnet50_units, model_name="ResNet-50")
    assert benchmark.within("balanced", 0.05)
    assert not benchmark.within("replicated", 0.05)
    text = benchmark_markdown(benchmark)
    lines = text.splitlines()
    assert lines[0] == BENCHMARK_HEADING
    assert "`conv5_block1_2_conv/A` (n = 4609)" in text
    shares = table_rows(
        lines, "| replicas | bound | round_robin | balanced | replicated | balanced / bound |"
    )
    assert [int(row[0]) for row in shares] == list(BENCHMARK_REPLICAS)
    assert all(row[4] == "100.0%" for row in shares)  # replicated
    assert all(float(row[5]) <= 1.05 for row in shares)
    sharing = table_rows(
        lines,
        "| replicas | auto | all_reduce: handed in = buffer | all_gather: handed in | "
        "all_gather: buffer |",
    )
    assert [int(row[0]) for row in sharing] == list(BENCHMARK_REPLICAS)
    assert {row[1] for row in sharing} <= {"all_reduce", "all_gather"}


# --- writing BENCHMARKS.md ---------------------------------------------------------------
SECTION = BENCHMARK_HEADING + "\n\nnew table\n"


def test_markdown_section_is_appended_when_absent(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Autoencoder\n\nloss 70 at step 88\n")
    write_markdown_section(str(path), SECTION)
    assert path.read_text() == (
        "# Benchmarks\n\n## Autoencoder\n\nloss 70 at step 88\n\n" + SECTION
    )
    write_markdown_section(str(tmp_path / "new.md"), SECTION)
    assert (tmp_path / "new.md").read_text() == SECTION


def test_markdown_section_replaces_only_its_own_text(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    others = "## Autoencoder\n\n```bash\n# not a heading\n```\n"
    path.write_text(
        "# Benchmarks\n\n" + BENCHMARK_HEADING + "\n\nold table\n```\n# old code\n```\n\n" + others
    )
    write_markdown_section(str(path), SECTION)
    assert path.read_text() == "# Benchmarks\n\n" + SECTION + "\n" + others


# --- the command line ----------------------------------------------------------------------
def test_tune_placement_cli_measures_and_prints_json():
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "tune_placement.py"),
            "convnet",
            "--replicas",
            "2",
            "--measure",
            "--repeats",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["model"] == "convnet"
    assert info["cost_model"].startswith("MeasuredCostModel(method='cholesky'")
    assert [u["name"] for u in info["plans"][0]["units"]] == [name for name, _, _ in CONVNET_UNITS]
    assert info["recommended"] in ("round_robin", "balanced")
    assert info["kfac_argument"] == f'placement="{info["recommended"]}"'
