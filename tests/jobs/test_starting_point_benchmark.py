"""The starting-point benchmark (kfac_dist/jobs/starting_point_benchmark.py): its choice of
point (the best worst task), its ratios, and the job end to end on the MLP at a tiny size.
No timing is asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

from kfac_dist.jobs import benchmarks, tuner
from kfac_dist.jobs import starting_point_benchmark as spb


def test_a_point_that_misses_a_target_loses_to_any_point_that_reaches_every_one():
    reached = benchmarks.Crossing(1.0, 10, 2.0)
    missed = benchmarks.Crossing(1.0, None, None)
    assert spb.seconds_ratio(reached, benchmarks.Crossing(1.0, 40, 8.0)) == 0.25
    assert math.isinf(spb.seconds_ratio(missed, reached))
    assert spb.seconds_ratio(reached, missed) == 0.0  # Adam did not reach it
    ratios = [
        {"mlp": 0.2, "convnet": math.inf, "autoencoder": 0.1},  # best on two, misses one
        {"mlp": 0.9, "convnet": 0.8, "autoencoder": 0.7},
        {"mlp": 0.5, "convnet": 0.95, "autoencoder": 0.3},
    ]
    assert spb.choose(ratios) == 1
    assert spb.choose([{"mlp": 0.5}, {"mlp": 0.5}]) == 0  # ties: the first


def test_the_job_runs_every_candidate_against_adam_and_writes_its_section(tmp_path):
    """Two candidates on the MLP, 500 digits, 30 steps; a target both optimizers reach."""
    candidates = (
        {"learning_rate": 0.1, "damping": 0.01, "norm_constraint": 0.01},
        {"learning_rate": 0.1, "damping": 0.01, "norm_constraint": 0.01, "cov_update_every": 5},
    )
    result = spb.run_benchmark(
        tasks=("mlp",),
        candidates=candidates,
        targets={"mlp": 2.0},
        steps={"adam": 30, "kfac": 30},
        limit=500,
        interleave_rounds=1,
        progress=None,
    )
    (task,) = result["tasks"]
    adam = task["adam"].crossing(2.0)
    assert adam.step is not None and task["adam"].steps == adam.step  # stopped at the target
    for run, ratio in zip(task["kfac"], task["ratios"]):
        kfac = run.crossing(2.0)
        assert kfac.step is not None and run.steps == kfac.step
        assert math.isclose(ratio, kfac.seconds / adam.seconds)
    assert result["chosen"] == spb.choose([{"mlp": r} for r in task["ratios"]])
    assert result["floor_holds"] == (result["worst_ratio"] < 1.0)
    assert set(task["interleaved"]) == {"adam", "kfac"}
    section = spb.benchmark_markdown(result)
    assert section.startswith(spb.SECTION_HEADING + "\n")
    assert "**(chosen)**" in section and "cov_update_every 5" in section
    payload = json.loads(spb.to_json(result))
    assert payload["tasks"][0]["ratios"] == task["ratios"] and "_models" not in payload["tasks"][0]
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# B\n\n## Other\n\nkept\n")
    tuner.write_markdown_section(str(path), section)
    text = path.read_text()
    assert "kept" in text and text.count(spb.SECTION_HEADING) == 1


def test_help_answers_without_loading_tensorflow():
    code = (
        "import sys; from kfac_dist.jobs import starting_point_benchmark as spb\n"
        "try:\n    spb.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--tasks" in done.stdout and "--write" in done.stdout
