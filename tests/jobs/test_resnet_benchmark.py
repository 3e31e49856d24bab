"""The ResNet-50 benchmark (kfac_dist/jobs/resnet_benchmark.py): its variants, its bookkeeping
(summaries, ratios, floors, breakdown, the section and its merge), an end-to-end run on a tiny
stand-in model in subprocesses, and a `--help` that does not load TensorFlow. No timing is
asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest

from kfac_dist.jobs import resnet_benchmark as rb
from tests import paths


def test_the_variants_switch_off_statistics_or_inversions_and_keep_the_rest():
    full = rb.kfac_arguments("kfac", 5, {"max_factor_dim": 1024})
    assert full == {**rb.KFAC_CONVNET, "invert_every": 5, "max_factor_dim": 1024}
    assert full["stagger_inverses"] is True
    no_stats = rb.kfac_arguments("kfac_no_statistics", 5)
    assert no_stats["cov_update_every"] == rb.NEVER and no_stats["invert_every"] == 5
    no_inv = rb.kfac_arguments("kfac_no_inversion", 5)
    assert no_inv["invert_every"] == rb.NEVER and no_inv["stagger_inverses"] is False
    assert no_inv["cov_update_every"] == rb.KFAC_CONVNET["cov_update_every"] == 5
    neither = rb.kfac_arguments("kfac_neither", 5)
    assert (neither["invert_every"], neither["cov_update_every"]) == (rb.NEVER, rb.NEVER)
    with pytest.raises(ValueError, match="not a K-FAC variant"):
        rb.kfac_arguments("adam", 5)


def test_kfac_args_are_python_literals_or_bare_strings():
    assert rb.parse_kfac_arg("max_factor_dim=1024") == ("max_factor_dim", 1024)
    assert rb.parse_kfac_arg("sync_chunk_bytes=None") == ("sync_chunk_bytes", None)
    assert rb.parse_kfac_arg("inverse_method=eigen") == ("inverse_method", "eigen")
    assert rb.parse_kfac_arg("fisher_approx={'head': 'diagonal'}")[1] == {"head": "diagonal"}
    args = rb.parse_args(["--kfac-arg", "damping=0.1", "--kfac-arg", "stagger_inverses=False"])
    assert dict(args.kfac_arg) == {"damping": 0.1, "stagger_inverses": False}
    assert args.steps == 1 + 2 * rb.KFAC_CONVNET["invert_every"]
    with pytest.raises(SystemExit):
        rb.parse_args(["--kfac-arg", "no_value"])


def test_summaries_amortize_over_whole_periods_after_the_first_step():
    seconds = [9.0, 1.0, 5.0, 1.0, 3.0, 100.0]  # invert_every 2: periods [5, 1] [3, 100]... cut
    got = rb.summarize(seconds, 2)
    assert got["first"] == 9.0 and got["max"] == 100.0 and got["median"] == 3.0
    assert got["whole_periods"] == 2 and got["amortized"] == pytest.approx((1 + 5 + 1 + 3) / 4)
    assert rb.summarize([2.0, 4.0], 3)["amortized"] == 4.0  # no whole period: every later step


def _fake(amortized: float, first: float, rss: int) -> dict:
    return {"step_seconds": [first] + [amortized] * 4, "peak_rss_bytes": rss, "losses": [1.0]}


def test_ratios_floors_and_breakdown_against_hand_computed_numbers():
    runs = {
        "adam": _fake(1.0, 10.0, 100),
        "kfac": _fake(6.0, 20.0, 160),
        "kfac_no_statistics": _fake(4.0, 20.0, 160),
        "kfac_no_inversion": _fake(3.5, 20.0, 160),
        "kfac_neither": _fake(1.5, 20.0, 160),
    }
    got = rb.analyse(runs, 2, replicas=1)
    assert got["ratios"]["amortized"] == 6.0 and got["ratios"]["first"] == 2.0
    assert got["ratios"]["peak_rss_bytes"] == 1.6
    assert got["floors_met"] == {"amortized": False, "first": False, "peak_rss_bytes": False}
    assert rb.analyse(runs, 2, replicas=2)["floors_met"]["peak_rss_bytes"] is True  # ≤ 2×
    parts = got["breakdown_seconds"]
    assert parts["statistics"] == 2.0 and parts["inversion"] == 2.5
    assert parts["preconditioning_and_rest"] == 0.5
    assert parts["not_additive"] == pytest.approx(5.0 - 5.0)
    assert parts["statistics_without_inversion"] == 2.0  # no inversion − neither
    assert parts["inversion_without_statistics"] == 2.5  # no statistics − neither
    assert got["breakdown_over_adam"]["inversion"] == 2.5  # Adam's amortized step is 1 s
    only = rb.analyse({"adam": runs["adam"], "kfac": runs["kfac"]}, 2, replicas=1)
    assert only["breakdown_seconds"]["statistics"] is None
    assert "not_additive" not in only["breakdown_seconds"]


def test_the_section_keeps_the_other_settings_subsection():
    runs = {"adam": _fake(1.0, 10.0, 2**30), "kfac": _fake(2.0, 12.0, 2**31)}

    def setting(replicas: int) -> dict:
        return {
            "replicas": replicas,
            "setting": rb.SETTING_LABELS[replicas],
            "runs": runs,
            "date": "today",
            "command": f"python scripts/benchmark_resnet.py --replicas {replicas}",
            **rb.analyse(runs, 2, replicas),
        }

    one = rb.benchmark_markdown([setting(1)])
    assert one.startswith(rb.SECTION_HEADING) and "### One device" in one
    assert "| amortized step | 1.00 s | 2.00 s | 2.00× | ≤ 2× ✓ |" in one
    assert "| peak RSS | 1.00 GiB | 2.00 GiB | 2.00× | ≤ 1.5× ✗ |" in one
    both = rb.benchmark_markdown([setting(2)], keep=one)
    assert both.index("### One device") < both.index("### MirroredStrategy")
    assert "--replicas 1`" in both and "--replicas 2`" in both
    again = rb.benchmark_markdown([setting(1)], keep=both)
    assert again.count("### One device") == 1 and again.count("### MirroredStrategy") == 1


def test_a_tiny_run_end_to_end_reports_every_field(tmp_path):
    out, markdown = tmp_path / "out.json", tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    command = [sys.executable, "-m", "kfac_dist.jobs.resnet_benchmark", "--model", rb.TINY]
    command += ["--input-size", "8", "--batch", "4", "--invert-every", "2", "--steps", "3"]
    command += ["--variants", "adam", "kfac", "--kfac-arg", "damping=0.1", "--quiet"]
    command += ["--json", str(out), "--write", "--output", str(markdown)]
    done = subprocess.run(command, cwd=paths.ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (setting,) = json.loads(out.read_text())["settings"]
    assert setting["replicas"] == 1 and set(setting["runs"]) == {"adam", "kfac"}
    for name, run in setting["runs"].items():
        assert run["exit_code"] == 0 and "error" not in run
        assert len(run["step_seconds"]) == 3 and all(math.isfinite(v) for v in run["losses"])
        assert run["peak_rss_bytes"] >= run["self_peak_rss_bytes"] * 0.9 > 0
        summary = setting["summaries"][name]
        assert {"first", "median", "max", "amortized", "peak_rss_bytes"} <= set(summary)
    kfac = setting["runs"]["kfac"]
    assert kfac["kfac_arguments"]["damping"] == 0.1 and kfac["kfac_arguments"]["invert_every"] == 2
    memory = kfac["placement"]["memory_per_replica"]
    # Factors of the tiny net: conv_1 (3·9+1)² + 4², conv_2 (4·9+1)² + 4², head 5² + 10²,
    # the BatchNormalization's scale-shift block 2·4 (diagonal), all float32, plus the inverses.
    assert memory["factor_sums"] >= 4 * (28**2 + 37**2 + 25 + 100 + 2 * 16)
    assert memory["state"] == memory["factor_sums"] + memory["inverses"]
    assert kfac["optimizer_variable_bytes"] >= memory["state"]
    assert kfac["placement"]["bytes_per_factor_sync"] > 0
    assert set(setting["ratios"]) == {"first", "median", "max", "amortized", "peak_rss_bytes"}
    assert all(v is not None and v > 0 for v in setting["ratios"].values())
    text = markdown.read_text(encoding="utf-8")
    assert "## Other\n\nkept" in text and rb.SECTION_HEADING in text
    for row in ("first step", "median step", "max step", "amortized step", "peak RSS"):
        assert f"| {row}" in text
    assert "K-FAC memory per replica (placement_report): state" in text


def test_help_answers_without_loading_tensorflow():
    started = time.perf_counter()
    code = (
        "import sys\nfrom kfac_dist.jobs import resnet_benchmark as rb\n"
        "try:\n    rb.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=paths.ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--kfac-arg" in done.stdout and "--replicas" in done.stdout
    assert time.perf_counter() - started < 20  # no TensorFlow import (seconds by itself)


def test_json_files_of_one_replica_count_merge_into_one_setting():
    def payload(command: str, runs: dict) -> dict:
        setting = {"replicas": 1, "setting": rb.SETTING_LABELS[1], "runs": runs, "date": "d"}
        return {"command": command, "date": "d", "settings": [{**setting, "command": command}]}

    first = payload("a", {"adam": _fake(1.0, 10.0, 100), "kfac": _fake(6.0, 20.0, 160)})
    later = payload("b", {"kfac_no_inversion": _fake(3.5, 20.0, 160)})
    (merged,) = rb.merge_results([first, later], invert_every=2)
    assert set(merged["runs"]) == {"adam", "kfac", "kfac_no_inversion"}
    assert merged["breakdown_seconds"]["inversion"] == 2.5
    assert merged["ratios"]["amortized"] == 6.0
    text = rb.setting_markdown(merged, merged["command"])
    assert "`a`; `b`" in text and "one after the other" in text


def test_a_run_killed_at_the_rss_limit_reports_its_peak_as_a_lower_bound():
    killed = {"step_seconds": [], "peak_rss_bytes": 4 * 2**30, "error": "killed at RSS 4.0 GiB"}
    runs = {"adam": _fake(1.0, 10.0, 2**30), "kfac": killed}
    result = {"replicas": 2, "setting": rb.SETTING_LABELS[2], "runs": runs, "date": "d"}
    result.update(rb.analyse(runs, 2, replicas=2))
    assert result["floors_met"] == {"amortized": None, "first": None, "peak_rss_bytes": False}
    text = rb.setting_markdown(result, "cmd")
    assert "| peak RSS | 1.00 GiB | > 4.00 GiB | > 4.00× | ≤ 2× ✗ |" in text
    assert "| amortized step | 1.00 s | — | — | ≤ 2× |" in text
    assert "K-FAC did not finish: killed at RSS 4.0 GiB" in text
