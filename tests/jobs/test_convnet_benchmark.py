"""The convnet benchmark (kfac_dist/jobs/convnet_benchmark.py): its model (every variable
in one structured K-FAC block), its bookkeeping (the validation error as a run, the best
point, the README point against Adam) and the job end to end at a tiny size. No timing
is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from kfac_dist import registration
from kfac_dist.blocks import ConvBlock, DenseBlock, ScaleShiftBlock
from kfac_dist.jobs import benchmarks, tuner
from kfac_dist.jobs import convnet_benchmark as cb

TINY_FILTERS = (4, 8)


def _run(name: str, step_seconds: list[float], checks: list[tuple[int, float]], target: float):
    losses = [1.0] * len(step_seconds)
    run = benchmarks.RunResult(name, {}, losses, step_seconds)
    return cb.validation_run(run, checks, target)


def test_the_resnet_has_a_block_per_layer_and_a_stride_two_projection():
    model = cb.build_resnet(filters=TINY_FILTERS, seed=0)
    blocks = registration.collect_blocks(model, unsupported_layers="error")
    kinds = sorted(type(b).__name__ for b in blocks)
    # stem, 2 + 2 block convs, the projection; a BN after each; the head.
    assert kinds.count("ConvBlock") == 6 and kinds.count("ScaleShiftBlock") == 6
    assert kinds.count("DenseBlock") == 1 and len(kinds) == 13
    assert all(isinstance(b, (ConvBlock, DenseBlock, ScaleShiftBlock)) for b in blocks)
    owned = [v.path for b in blocks for v in b.variables]
    assert sorted(owned) == sorted(v.path for v in model.trainable_variables)
    assert model.get_layer("block_1_projection").strides == (2, 2)
    assert model.output_shape == (None, 10)
    assert model.get_layer("pool").input.shape[1:] == (14, 14, 8)


def test_the_validation_error_crosses_at_the_first_check_reaching_the_target():
    run = _run("r", [5.0, 1.0, 1.0, 1.0, 1.0, 1.0], [(2, 0.5), (4, 0.97), (6, 0.99)], 0.97)
    np.testing.assert_allclose(run.losses, [np.nan, 0.5, 0.5, 0.03, 0.03, 0.01], atol=1e-12)
    crossing = run.crossing(cb.error_threshold(0.97))
    assert (crossing.step, crossing.seconds) == (4, 3.0)  # steps 2..4; step 1 compiles
    assert math.isclose(run.final_loss, 0.01)
    never = _run("n", [1.0] * 4, [(2, 0.5), (4, 0.9)], 0.97)
    assert never.crossing(cb.error_threshold(0.97)).step is None
    with pytest.raises(ValueError, match="outside"):
        _run("x", [1.0] * 2, [(3, 0.5)], 0.97)


def test_the_best_point_is_fewest_steps_then_seconds_and_the_readme_point_is_first():
    t = cb.error_threshold(0.9)
    slow = _run("slow", [1.0] * 8, [(4, 0.5), (8, 0.95)], 0.9)
    fast = _run("fast", [9.0] * 8, [(4, 0.92)], 0.9)
    never = _run("never", [0.1] * 8, [(8, 0.5)], 0.9)
    assert benchmarks.best_run([never, slow, fast], t) is fast
    runs = {"kfac": [slow, fast], "adam": [fast, never]}
    readme = cb.readme_against_adam(runs, t, {"kfac": 2.0, "adam": 1.0})
    # kfac's first run (8 steps, 7 s) over adam's first (4 steps, 27 s).
    assert readme["steps_ratio"] == 2.0 and math.isclose(readme["seconds_ratio"], 7 / 27)
    assert readme["interleaved_seconds_ratio_estimate"] == 4.0 and readme["beats_adam"]
    assert cb.readme_against_adam({"kfac": [never], "adam": [fast]}, t, None)["beats_adam"] is None


def test_the_job_end_to_end_at_a_tiny_size(monkeypatch, tmp_path):
    monkeypatch.setattr(cb, "INTERLEAVE_BLOCK", 2)
    kfac = {**cb.README_POINT, "invert_every": 2}
    grids = {
        "adam": ({"learning_rate": 1e-3}, {"learning_rate": 3e-3}),
        "sgd": ({"learning_rate": 0.03},),
        "muon": ({"learning_rate": 1e-3},),
        "kfac": (kfac,),
    }
    result = cb.run_benchmark(
        steps=6,
        batch_size=16,
        grids=grids,
        target=0.0,  # reached at the first check: every run stops at step 2
        eval_every=2,
        filters=TINY_FILTERS,
        limit=200,
        held_out=40,
        interleave_rounds=1,
        progress=None,
    )
    assert result["parameters"] == cb.build_resnet(filters=TINY_FILTERS).count_params()
    for name in cb.OPTIMIZERS:
        assert len(result["runs"][name]) == len(grids[name])
        for run in result["runs"][name]:
            assert run["steps_run"] == 2 and run["checks"][0][0] == 2
            assert (run["crossings"][0]["step"], run["steps"]) == (2, 2)
            assert 0.0 <= run["last_accuracy"] <= 1.0
    assert result["best"]["adam"]["hyperparameters"] in [dict(p) for p in grids["adam"]]
    assert set(result["interleaved_seconds_per_step"]) == set(cb.OPTIMIZERS)
    seconds = result["kfac_profile"]["seconds_per_step"]
    assert set(seconds) == {"kfac", "no_inverse", "no_statistics", "adam", "sgd", "muon"}
    split = result["kfac_profile"]["split"]
    assert math.isclose(
        split["inversion"] + split["statistics"] + split["preconditioning_and_rest"],
        seconds["kfac"] - seconds["adam"],
    )
    for other in cb.OTHERS:
        assert result["ratios"][f"steps_to_target_kfac_over_{other}"] == 1.0
        assert f"seconds_to_target_kfac_over_{other}" in result["floor"]["met"]
    assert result["floor"]["holds"] == all(v is True for v in result["floor"]["met"].values())
    assert result["readme_point"]["steps_ratio"] == 1.0
    assert result["readme_point"]["kfac"].startswith("kfac[learning_rate=0.3, damping=0.01")
    section = cb.benchmark_markdown(result)
    assert section.startswith(cb.SECTION_HEADING + "\n")
    for text in ("| Adam |", "| SGD (momentum 0.9) |", "| Muon |", "| K-FAC |", "point 7"):
        assert text in section
    assert "Where K-FAC's step goes" in section and "ConvBlock" in section
    payload = json.loads(cb.to_json(result))
    assert set(payload["records"]) == set(cb.OPTIMIZERS) and "_runs" not in payload
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n## Other\n\nkept\n")
    tuner.write_markdown_section(str(path), section)
    text = path.read_text()
    assert "kept" in text and text.count(cb.SECTION_HEADING) == 1


def test_help_answers_without_loading_tensorflow():
    code = (
        "import sys; from kfac_dist.jobs import convnet_benchmark as cb\n"
        "try:\n    cb.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--target" in done.stdout and "--write" in done.stdout
    args = cb.build_parser().parse_args([])
    assert (args.steps, args.batch_size, args.target) == (None, 64, 0.97)
