"""The package's shape: the library never imports the jobs, no import cycle, light imports.

Every import statement counts, also one inside a function: a deferred import
that hides a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kfac_dist"
JOBS = "kfac_dist.jobs"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The package's module an import names (a module, or the package that holds a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "kfac_dist" and (module := _resolve(name)):
                found.add(module)
    return found


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def _is_job(module: str) -> bool:
    return module == JOBS or module.startswith(JOBS + ".")


def test_the_library_never_imports_the_jobs():
    offending = {
        module: sorted(filter(_is_job, imported))
        for module, imported in GRAPH.items()
        if not _is_job(module) and any(map(_is_job, imported))
    }
    assert not offending, offending


def test_no_import_cycle_anywhere_in_the_package():
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(GRAPH[module]):
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_sees_what_it_should():
    # Guards the two tests above against a walk that finds nothing.
    assert "kfac_dist.curvature" in GRAPH["kfac_dist.optimizer"]
    assert "kfac_dist.jobs.train" in GRAPH["kfac_dist.jobs.commands"]  # a deferred import
    assert len(MODULES) > 40


def _loaded_after(code: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(sorted(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return set(eval(done.stdout.strip().splitlines()[-1]))  # noqa: S307 - our own output


HEAVY = {"tensorflow", "keras"}


def test_the_pure_python_parts_import_without_tensorflow_or_keras():
    loaded = _loaded_after(
        "import kfac_dist, kfac_dist.placement, kfac_dist.heartbeat, kfac_dist.options\n"
        "import kfac_dist.jobs.launch, kfac_dist.jobs.commands, kfac_dist.jobs.main_job"
    )
    assert not HEAVY & loaded


def test_the_optimizer_import_loads_tensorflow_and_checks_its_version():
    loaded = _loaded_after("import kfac_dist as kfac\nkfac.Kfac")
    assert {"tensorflow", "keras", "kfac_dist._versions"} <= loaded


@pytest.mark.parametrize(
    "script",
    [
        "launch_local.py",
        "main_job.py",
        "train.py",
        "train_tpu.py",
        "benchmark_autoencoder.py",
        "benchmark_placement.py",
        "benchmark_replicas.py",
        "benchmark_trace.py",
        "tune_placement.py",
    ],
)
def test_help_of_a_command_loads_neither_tensorflow_nor_keras(script):
    path = ROOT / "scripts" / script
    loaded = _loaded_after(
        "import runpy, sys, contextlib, io\n"
        f"sys.argv = [{str(path)!r}, '--help']\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        f"    runpy.run_path({str(path)!r}, run_name='__main__')"
    )
    assert not HEAVY & loaded
