"""Every ```python block of README.md runs as written: a newcomer's first copy-paste works.

Each block runs on its own, in a fresh Python process (as a user runs it: the
Quick start creates `MirroredStrategy()` over every device, and TensorFlow
allows one collective group per device set in a process, so it cannot share
this test process's logical CPUs with other tests' strategies), in a
temporary working directory (a block may save a model). The blocks build
their own tiny data, so they are quick. A failure's traceback points at the
README's own line numbers.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.paths import ROOT as ROOT_PATH

ROOT = ROOT_PATH
README = ROOT / "README.md"
# Runs one block, compiled under README.md's name so that tracebacks point there.
RUNNER = (
    "import sys\n"
    "code = open(sys.argv[1], encoding='utf-8').read()\n"
    "exec(compile(code, sys.argv[2], 'exec'), {'__name__': '__main__'})\n"
)


def python_blocks(text: str) -> list[tuple[str, int, str]]:
    """(the heading above the block, the block's first line number, its code) per block;
    a `#` line inside any fenced block is code, not a heading."""
    blocks, heading, fence, start, code = [], "top", None, 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None and line.startswith("```"):
            fence, start, code = line[3:].strip(), number + 1, []
        elif fence is not None and line.strip() == "```":
            if fence == "python":
                blocks.append((heading, start, "".join(f"{row}\n" for row in code)))
            fence = None
        elif fence is not None:
            code.append(line)
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_blocks_are_found_with_their_lines():
    text = "# A\n\n```python\nx = 1\n```\n\n## B\n```bash\nls\n```\n```python\ny = 2\n```\n"
    assert python_blocks(text) == [("A", 4, "x = 1\n"), ("B", 12, "y = 2\n")]
    headings = [heading for heading, _, _ in BLOCKS]
    assert "Quick start" in headings and "Migrating from kfac 0.2.4" in headings


@pytest.mark.parametrize(
    "heading, first_line, code",
    BLOCKS,
    ids=[f"line {line} ({heading})" for heading, line, _ in BLOCKS],
)
def test_readme_python_block_runs_as_written(heading, first_line, code, tmp_path):
    block = tmp_path / "block.py"
    block.write_text("\n" * (first_line - 1) + code, encoding="utf-8")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, str(block), str(README)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, f"README block at line {first_line}:\n{result.stderr[-6000:]}"
