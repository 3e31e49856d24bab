"""The package's shape: the library never imports the jobs, no import cycle, light imports,
thin scripts, console scripts that resolve.

Every import statement counts, also one inside a function: a deferred import
that hides a cycle is still a cycle. Only an import under `if TYPE_CHECKING:`,
which never runs and names a type (the step names the `Kfac` it is handed),
is left out of the cycle check; the library still may not import the jobs
even there. A command's `--help` answers in well under
a second when it loads neither TensorFlow nor Keras (they take seconds): that,
not a wall-clock time, is what the tests check.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import ROOT as ROOT_PATH

ROOT = ROOT_PATH
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


def _type_checking_only(tree: ast.AST) -> set[ast.AST]:
    """The import statements under `if TYPE_CHECKING:` (run by type checkers only)."""
    return {
        inner
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }


def _imports(path: Path, runtime_only: bool = False) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if node in skipped:
            continue
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
RUNTIME_GRAPH = {
    module: _imports(path, runtime_only=True) - {module} for module, path in MODULES.items()
}


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
        for imported in sorted(RUNTIME_GRAPH[module]):
            if state.get(imported) == "open":
                cycles.append([*path[path.index(imported) :], imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in sorted(RUNTIME_GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_graph_sees_what_it_should():
    # Guards the two tests above against a walk that finds nothing.
    assert "kfac_dist.curvature" in GRAPH["kfac_dist.optimizer"]
    assert "kfac_dist.jobs.train_run" in GRAPH["kfac_dist.jobs.train"]  # a deferred import
    assert len(MODULES) > 40
    # A type-only import is in the full graph, not in the run-time one.
    assert "kfac_dist.optimizer" in GRAPH["kfac_dist.step"]
    assert "kfac_dist.optimizer" not in RUNTIME_GRAPH["kfac_dist.step"]


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
        "import kfac_dist.jobs.launch, kfac_dist.jobs.train, kfac_dist.jobs.main_job\n"
        "from kfac_dist.jobs import train\n"
        "train.__doc__, train.main, train.build_parser, getattr(train, '__wrapped__', None)"
    )
    assert not HEAVY & loaded


def test_the_optimizer_import_loads_tensorflow_and_checks_its_version():
    loaded = _loaded_after("import kfac_dist as kfac\nkfac.Kfac")
    assert {"tensorflow", "keras", "kfac_dist._versions"} <= loaded


SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def _is_main_guard(node: ast.stmt) -> bool:
    """Whether `node` is `if __name__ == "__main__":`."""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and len(node.test.comparators) == 1
        and isinstance(node.test.comparators[0], ast.Constant)
        and node.test.comparators[0].value == "__main__"
    )


def _has_main_guard(path: Path) -> bool:
    return any(map(_is_main_guard, ast.parse(path.read_text(), str(path)).body))


# The job modules that run as commands: `python -m kfac_dist.jobs.<name>`.
COMMAND_MODULES = sorted(
    module for module, path in MODULES.items() if _is_job(module) and _has_main_guard(path)
)


def test_the_commands_are_found():
    # Guards the parametrized tests below against a search that finds nothing.
    assert {
        "kfac_dist.jobs.train",
        "kfac_dist.jobs.train_tpu",
        "kfac_dist.jobs.main_job",
        "kfac_dist.jobs.launch",
        "kfac_dist.jobs.autoencoder_benchmark",
        "kfac_dist.jobs.placement_benchmark",
        "kfac_dist.jobs.replica_benchmark",
        "kfac_dist.jobs.trace_benchmark",
        "kfac_dist.jobs.tuner",
    } <= set(COMMAND_MODULES)
    assert len(SCRIPTS) >= 9


def _help_loads(run: str) -> set[str]:
    """The modules loaded by `--help` of the command `run` starts (runpy code, with
    sys.argv set); asserts that it exits with status 0 and prints a usage."""
    loaded = _loaded_after(
        "import contextlib, io, runpy, sys\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        f"        {run}\n"
        "    except SystemExit as exit:\n"
        "        code = exit.code\n"
        "    else:\n"
        "        code = 'no exit'\n"
        "assert code in (0, None), code\n"
        "assert out.getvalue().startswith('usage:'), out.getvalue()[:200]"
    )
    return loaded


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_help_of_a_job_module_loads_neither_tensorflow_nor_keras(module):
    loaded = _help_loads(
        f"sys.argv = [{module!r}, '--help']; "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    assert not HEAVY & loaded


@pytest.mark.parametrize("script", [path.name for path in SCRIPTS])
def test_help_of_a_script_loads_neither_tensorflow_nor_keras(script):
    path = str(ROOT / "scripts" / script)
    loaded = _help_loads(
        f"sys.argv = [{path!r}, '--help']; runpy.run_path({path!r}, run_name='__main__')"
    )
    assert not HEAVY & loaded


def _script_target(path: Path) -> tuple[str, str, ast.Call]:
    """A thin script's (module, function) and the call of it: the script is a docstring,
    `import sys`, one `from kfac_dist.jobs.<module> import <function>`, and
    `if __name__ == "__main__": sys.exit(<function>(...))`; it defines nothing."""
    body = ast.parse(path.read_text(), str(path)).body
    assert len(body) == 4, [type(node).__name__ for node in body]
    docstring, import_sys, import_main, guard = body
    assert isinstance(docstring, ast.Expr) and isinstance(docstring.value, ast.Constant)
    assert isinstance(docstring.value.value, str) and docstring.value.value.strip()
    assert isinstance(import_sys, ast.Import) and [a.name for a in import_sys.names] == ["sys"]
    assert isinstance(import_main, ast.ImportFrom) and import_main.level == 0
    module = import_main.module or ""
    assert module.startswith(JOBS + ".")
    assert len(import_main.names) == 1 and import_main.names[0].asname is None
    function = import_main.names[0].name
    assert isinstance(guard, ast.If) and _is_main_guard(guard) and not guard.orelse
    assert len(guard.body) == 1, "the guard holds one call"
    (exit_call,) = guard.body
    assert isinstance(exit_call, ast.Expr) and isinstance(exit_call.value, ast.Call)
    assert ast.unparse(exit_call.value.func) == "sys.exit"
    (call,) = exit_call.value.args
    assert isinstance(call, ast.Call) and ast.unparse(call.func) == function
    # Arguments only of names the script has (`__file__`): no logic hides in them.
    for node in ast.walk(call):
        assert isinstance(node, (ast.Call, ast.Name, ast.keyword, ast.Load)), ast.unparse(node)
    return module, function, call


@pytest.mark.parametrize("script", [path.name for path in SCRIPTS])
def test_a_script_is_a_thin_entry_point(script):
    module, function, _ = _script_target(ROOT / "scripts" / script)
    assert module in COMMAND_MODULES
    assert function in _top_level_functions(MODULES[module])


def _top_level_functions(path: Path) -> set[str]:
    return {
        node.name
        for node in ast.parse(path.read_text(), str(path)).body
        if isinstance(node, ast.FunctionDef)
    }


def _console_scripts() -> dict[str, str]:
    """setup.py's console scripts, name: "module:function", read from its AST."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entry_points = ast.literal_eval(node.value)
            return dict(entry.split("=", 1) for entry in entry_points["console_scripts"])
    raise AssertionError("setup.py declares no entry_points")


CONSOLE_SCRIPTS = _console_scripts()


def test_every_console_script_resolves_to_a_function_without_loading_tensorflow():
    targets = sorted(set(CONSOLE_SCRIPTS.values()))
    assert len(targets) == len(CONSOLE_SCRIPTS) >= 9
    loaded = _loaded_after(
        "import importlib\n"
        f"for target in {targets!r}:\n"
        "    module, _, name = target.partition(':')\n"
        "    assert callable(getattr(importlib.import_module(module), name)), target"
    )
    assert not HEAVY & loaded


def test_the_scripts_and_the_console_scripts_are_the_same_commands():
    scripts = {":".join(_script_target(path)[:2]) for path in SCRIPTS}
    assert scripts == set(CONSOLE_SCRIPTS.values())
    assert all(name.startswith("kfac-") for name in CONSOLE_SCRIPTS)
