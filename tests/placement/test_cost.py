"""Tests of the cost models: flop counts by hand, measured times on tiny sizes."""

import ast
import pathlib

import pytest

import kfac_dist.placement
from kfac_dist.placement.cost import EIGEN_FLOP_FACTOR, FlopCostModel, MeasuredCostModel
from kfac_dist.placement.units import InversionUnit

PLACEMENT_DIR = pathlib.Path(kfac_dist.placement.__file__).parent


def test_flop_cost_is_cubic_for_matrices_and_linear_for_diagonals():
    model = FlopCostModel()
    assert model(InversionUnit("d/A", "d", 10)) == 1000.0
    assert model(InversionUnit("d/G", "d", 3)) == 27.0
    assert model(InversionUnit("bn/diag", "bn", 10, "diagonal")) == 10.0


def test_flop_cost_of_eigen_carries_its_constant_on_matrices_only():
    model = FlopCostModel("eigen")
    assert EIGEN_FLOP_FACTOR == 4.0
    assert model(InversionUnit("d/A", "d", 10)) == 4000.0
    assert model(InversionUnit("bn/diag", "bn", 10, "diagonal")) == 10.0


@pytest.mark.parametrize("model_class", [FlopCostModel, MeasuredCostModel])
def test_cost_models_reject_unknown_methods(model_class):
    with pytest.raises(ValueError, match=r"'qr'.*'cholesky', 'eigen'"):
        model_class("qr")


@pytest.mark.parametrize("repeats", [0, -2, 1.5, True])
def test_measured_cost_model_rejects_bad_repeats(repeats):
    with pytest.raises(ValueError, match="repeats"):
        MeasuredCostModel(repeats=repeats)


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
def test_measured_cost_model_times_each_size_once(method):
    model = MeasuredCostModel(method, repeats=2)
    small = model(InversionUnit("a/A", "a", 3))
    diagonal = model(InversionUnit("bn/diag", "bn", 3, "diagonal"))
    for seconds in (small, diagonal):
        assert isinstance(seconds, float)
        assert 0 < seconds < 10
    # Same size, other unit: the cached time, not a new (different) measurement.
    assert model(InversionUnit("b/G", "b", 3)) == small
    assert model(InversionUnit("ln/diag", "ln", 3, "diagonal")) == diagonal


def test_placement_modules_import_tensorflow_only_inside_functions():
    for path in sorted(PLACEMENT_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            for module in modules:
                assert module.split(".")[0] not in ("tensorflow", "keras"), path.name


def test_flop_cost_of_a_grouped_unit_is_its_groups_times_a_member():
    for method in ("cholesky", "eigen"):
        model = FlopCostModel(method)
        member = model(InversionUnit("d/A", "d", 6))
        assert model(InversionUnit("dw/A", "dw", 6, groups=7)) == 7 * member
    assert FlopCostModel()(InversionUnit("g/A", "g", 6, "diagonal", groups=7)) == 42.0


def test_measured_cost_model_times_a_grouped_unit_as_one_batch():
    model = MeasuredCostModel("cholesky", repeats=1)
    single = model(InversionUnit("a/A", "a", 3))
    grouped = model(InversionUnit("dw/A", "dw", 3, groups=4))
    assert 0 < single < 10 and 0 < grouped < 10
    assert set(model._seconds) == {("matrix", 3, 1), ("matrix", 3, 4)}
    assert model(InversionUnit("dw2/A", "dw2", 3, groups=4)) == grouped
