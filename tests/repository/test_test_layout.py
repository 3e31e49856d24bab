"""The tests' own layout: they mirror the package, and multi-process tests carry their marker.

`tests/test_x.py` tests `kfac_dist/x.py` (or the package `kfac_dist/x/`), and
`tests/a/b/` holds the tests of `kfac_dist/a/b/`. Tests of behaviour that
spans modules live in `tests/integration/`, checks of the repository itself
in `tests/repository/`, and the scripts run as workers in `tests/workers/`.
"""

from pathlib import Path

import pytest

from tests.multiworker import run_workers
from tests.paths import ROOT

TESTS = ROOT / "tests"
PACKAGE = ROOT / "kfac_dist"
OUTSIDE_THE_MIRROR = {"integration", "repository", "workers", "__pycache__"}


def _mirrors(path: Path) -> bool:
    return path.with_suffix(".py").exists() or path.is_dir()


def test_each_top_level_test_file_mirrors_a_module():
    strays = [
        test.name
        for test in TESTS.glob("test_*.py")
        if not _mirrors(PACKAGE / test.name.removeprefix("test_").removesuffix(".py"))
    ]
    assert not strays, f"no kfac_dist module for {strays}: move them to tests/integration/"


def test_each_test_directory_mirrors_a_package():
    directories = [
        path.relative_to(TESTS)
        for path in TESTS.rglob("*")
        if path.is_dir() and not OUTSIDE_THE_MIRROR & set(path.relative_to(TESTS).parts)
    ]
    assert directories, "the walk found no test directory"
    strays = [str(d) for d in directories if not (PACKAGE / d).is_dir()]
    assert not strays, f"no kfac_dist package for tests/{strays}"


def test_starting_workers_without_the_marker_is_an_error():
    with pytest.raises(RuntimeError, match="pytest.mark.multiprocess"):
        run_workers(TESTS / "workers" / "task_worker.py", 2, timeout=1)


@pytest.mark.multiprocess
def test_a_marked_test_may_start_workers():
    results = run_workers(TESTS / "workers" / "task_worker.py", 1, timeout=60)
    assert [(result.index, result.exit_code) for result in results] == [(0, 0)]
