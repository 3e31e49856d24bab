"""Commands leave the checkout clean: tracked files change only when asked, outputs are ignored."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kfac_dist.jobs import main_job
from tests.paths import ROOT as ROOT_PATH

ROOT = ROOT_PATH
SENTINEL = "# Benchmarks\n\nhand-written results that a plain run must not touch\n"
# Flags whose value is a file or folder the command writes.
OUTPUT_FLAGS = ("--checkpoint-dir", "--tensorboard-dir", "--json-out", "--out-dir", "--json")


def run_placement_benchmark(tree: Path, *args: str) -> subprocess.CompletedProcess:
    """scripts/benchmark_placement.py copied into `tree` (so that its default output,
    BENCHMARKS.md beside scripts/, is `tree`'s), on 2 replicas only."""
    (tree / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "benchmark_placement.py", tree / "scripts")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, str(tree / "scripts" / "benchmark_placement.py")]
    return subprocess.run(
        [*command, "--replicas", "2", *args],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_placement_benchmark_writes_benchmarks_md_only_when_asked(tmp_path):
    benchmarks_md = tmp_path / "BENCHMARKS.md"
    benchmarks_md.write_text(SENTINEL)
    printed = run_placement_benchmark(tmp_path)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "## Inverse placement on ResNet-50 shapes" in printed.stdout
    assert benchmarks_md.read_text() == SENTINEL

    shutil.rmtree(tmp_path / "scripts")
    written = run_placement_benchmark(tmp_path, "--write")
    assert written.returncode == 0, written.stderr[-2000:]
    text = benchmarks_md.read_text()
    assert text.startswith(SENTINEL.rstrip("\n")) and "## Inverse placement" in text


def documented_output_paths() -> list[str]:
    """Every output path that a command in README.md or docs/ writes, relative ones only."""
    paths = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for flag, value in re.findall(r"(--[a-z-]+)[ =]([^\s`\\]+)", page.read_text()):
            placeholder = re.fullmatch(r"[A-Z_]+", value)  # `--checkpoint-dir D` in a table
            if flag in OUTPUT_FLAGS and not placeholder and not value.startswith(("/", "$", '"')):
                paths.append(value)
    return paths


def git_ignored(paths: list[str]) -> set[str]:
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return set(result.stdout.split())


def test_what_the_documented_commands_write_is_ignored_by_git():
    paths = documented_output_paths()
    assert len(paths) >= 4  # the README's training command and docs/launching.md's
    defaults = [
        str(main_job.DEFAULT_OUT_DIR / main_job.PLOT_NAME),
        "logs/train",
        "ckpt/model.keras",
    ]
    outputs = [*paths, *defaults]
    assert sorted(set(outputs) - git_ignored(outputs)) == []


@pytest.mark.parametrize("tracked", ["README.md", "BENCHMARKS.md", "kfac_dist/__init__.py"])
def test_the_ignore_rules_leave_the_project_files_tracked(tracked):
    assert git_ignored([tracked]) == set()
