"""The README's Python examples run, its links resolve, and CI runs the README's test command.

Every ```python block of README.md runs, in order, in one namespace (later examples use the
names earlier ones made), so a test of block k first runs the blocks before it. A block
preceded by the HTML comment ``<!-- no-test -->`` is shown, not run (it needs weights from
the network); there are to be few of those. Dynamo is reset between tests (tests/conftest.py),
so a later block that calls an earlier block's compiled model compiles it again.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NO_TEST = "<!-- no-test -->"
MAX_LINES = 300
MAX_SKIPPED_BLOCKS = 2


class CodeBlock(NamedTuple):
    line: int  # 1-based line of the block's first code line in the README
    code: str
    runs: bool


def code_blocks(text: str, language: str = "python") -> list[CodeBlock]:
    """The fenced ``language`` blocks of a markdown text, each marked as run or not."""
    lines = text.splitlines()
    blocks, k = [], 0
    while k < len(lines):
        if lines[k].strip() == f"```{language}":
            before = next((lines[j].strip() for j in range(k - 1, -1, -1) if lines[j].strip()), "")
            end = k + 1
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"README.md:{k + 1}: a ```{language} block is never closed")
            blocks.append(CodeBlock(k + 2, "\n".join(lines[k + 1:end]), before != NO_TEST))
            k = end
        k += 1
    return blocks


BLOCKS = code_blocks(README.read_text(encoding="utf-8"))
_namespace: dict = {}
_done: dict[int, BaseException | None] = {}


def run_block(index: int) -> None:
    """Run block ``index`` once, after the blocks before it; re-raise a block's own failure."""
    for k in range(index + 1):
        block = BLOCKS[k]
        if not block.runs:
            continue
        if k not in _done:
            # Pad with blank lines so that a traceback points at the README's own line numbers.
            source = "\n" * (block.line - 1) + block.code
            try:
                exec(compile(source, str(README), "exec"), _namespace)
                _done[k] = None
            except BaseException as err:  # noqa: BLE001 - reported below, with the block's line
                _done[k] = err
        if _done[k] is not None:
            raise AssertionError(f"the README example at line {block.line} fails") from _done[k]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"line{b.line}" for b in BLOCKS])
def test_readme_example_runs(index):
    if not BLOCKS[index].runs:
        pytest.skip(f"marked {NO_TEST}")
    run_block(index)


def test_readme_runs_most_of_its_examples():
    skipped = [b.line for b in BLOCKS if not b.runs]
    assert sum(b.runs for b in BLOCKS) >= 3
    assert len(skipped) <= MAX_SKIPPED_BLOCKS, f"blocks at lines {skipped} are not run"


def test_the_block_parser_reads_markers_and_lines():
    text = "intro\n\n<!-- no-test -->\n```python\nx = 1\n```\n\n```python\ny = 2\nz = 3\n```\n"
    assert code_blocks(text) == [CodeBlock(5, "x = 1", False), CodeBlock(9, "y = 2\nz = 3", True)]


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_LINES, f"README.md has {len(lines)} lines (at most {MAX_LINES})"


def test_readme_links_to_files_that_exist():
    text = README.read_text(encoding="utf-8")
    targets = {t.split("#")[0] for t in re.findall(r"\]\(([^)#][^)]*)\)", text) if "://" not in t}
    missing = sorted(t for t in targets if t and not (ROOT / t).exists())
    assert not missing, f"README.md links to missing files: {missing}"


def test_ci_runs_the_readme_test_command_and_the_readme_names_the_demo():
    commands = [line.split("#")[0].strip() for b in code_blocks(README.read_text(encoding="utf-8"), "bash")
                for line in b.code.splitlines()]
    assert "make demo" in commands
    tests = [c for c in commands if c.startswith("make test")]
    assert tests == ["make test"], tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert any(re.match(r"^make test(\s|\|\||$)", line) for line in ci), "'.ci/run' no longer runs 'make test'"
