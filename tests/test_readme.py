"""Every ```python block of README.md runs as written: a newcomer's first copy-paste works.

Each block runs on its own, in a fresh namespace, in a temporary working
directory (a block may save a model), inside this test process: the blocks
build their own tiny data, so they are quick. A failure's traceback points at
the README's own line numbers.
"""

from __future__ import annotations

from pathlib import Path

import keras
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


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


@pytest.fixture
def keras_state_restored():
    """A block may set Keras' global dtype policy (mixed precision): later tests get it back."""
    policy = keras.mixed_precision.global_policy().name
    yield
    keras.mixed_precision.set_global_policy(policy)
    keras.backend.clear_session()


@pytest.mark.parametrize(
    "heading, first_line, code",
    BLOCKS,
    ids=[f"line {line} ({heading})" for heading, line, _ in BLOCKS],
)
def test_readme_python_block_runs_as_written(
    heading, first_line, code, tmp_path, monkeypatch, keras_state_restored
):
    monkeypatch.chdir(tmp_path)
    padded = "\n" * (first_line - 1) + code  # tracebacks name README.md's own lines
    namespace = {"__name__": "__main__"}
    exec(compile(padded, str(README), "exec"), namespace)
