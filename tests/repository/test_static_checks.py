"""The static checks CI runs: mypy on the package, ruff's lint and format on the tree.

Both tools come with the `test` extra. A missing tool fails the test rather
than skipping it, so that a CI that forgot the extra cannot pass unchecked.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT as ROOT_PATH

ROOT = ROOT_PATH
# ruff format would also reformat the Python blocks of README.md, whose
# comments are aligned on purpose: only the Python sources are formatted.
FORMATTED = ("kfac_dist", "tests", "scripts", "setup.py")


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m module args` from the repository root; fails the test if it is missing."""
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"{module} is not installed in {sys.executable}. The test extra provides it: "
            'pip install -e ".[test]"',
            pytrace=False,
        )
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def report(result: subprocess.CompletedProcess[str]) -> str:
    command = " ".join(result.args[1:])
    return f"{command} exited {result.returncode}:\n{result.stdout}{result.stderr}"


def test_mypy_passes_on_the_package(tmp_path: Path) -> None:
    # The configuration (strictness, per-module overrides) is pyproject.toml's.
    result = run_tool(
        "mypy", "--config-file", "pyproject.toml", "--cache-dir", str(tmp_path / "mypy")
    )
    assert result.returncode == 0, report(result)


def test_ruff_lint_and_format_pass() -> None:
    lint = run_tool("ruff", "check", "--no-cache", ".")
    assert lint.returncode == 0, report(lint)
    formatted = run_tool("ruff", "format", "--check", "--no-cache", *FORMATTED)
    assert formatted.returncode == 0, report(formatted)
