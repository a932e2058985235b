"""The README and the code's comments and docstrings say what is, never when or how it was done.

Looked for: dates (``2026-12-03``), run numbers ("stop 22"), clock times in UTC, and the
word "session". Code itself is not searched (an onnxruntime ``session`` variable is fine);
only comments and docstrings under the package folders, and every line of the README.
"""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CODE_FOLDERS = ("turbo_fx", "passes", "bench", "model_zoo")

# A date, a numbered run ("stop 22") or the word "session", in any case; UTC in capitals only.
PROCESS_WORDS = re.compile(r"20\d\d-\d\d-\d\d|\bstop \d+|\bsession\b", re.IGNORECASE)
UTC = re.compile(r"\bUTC\b")


def hits(text: str) -> bool:
    """Whether one line of text names a date, a numbered stop, UTC or a session."""
    return bool(PROCESS_WORDS.search(text) or UTC.search(text))


def comment_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every ``#`` comment of a Python source."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return [(tok.start[0], tok.string) for tok in tokens if tok.type == tokenize.COMMENT]


def docstring_lines(source: str) -> list[tuple[int, str]]:
    """(line number, text) of every line of the module's, classes' and functions' docstrings."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            value = body[0].value
            if isinstance(value.value, str):
                found += [(value.lineno + k, line) for k, line in enumerate(value.value.splitlines())]
    return found


def python_files() -> list[Path]:
    return sorted(path for folder in CODE_FOLDERS for path in (ROOT / folder).rglob("*.py"))


def offending_lines(path: Path) -> list[str]:
    """``file:line: text`` for each comment or docstring line of ``path`` with a process word."""
    source = path.read_text(encoding="utf-8")
    lines = comment_lines(source) + docstring_lines(source)
    name = path.relative_to(ROOT)
    return [f"{name}:{number}: {text.strip()[:120]}" for number, text in sorted(set(lines)) if hits(text)]


def test_the_pattern_catches_each_kind_and_spares_code_words():
    assert hits("measured 2026-12-03 on two cores")
    assert hits("the default before stop 22")
    assert hits("run at 04:31 UTC")
    assert hits("Session notes") and hits("this session's demo")
    assert not hits("an onnxruntime InferenceSession of the backbone")
    assert not hits("stop the loop at the first match") and not hits("the utc offset helper")


def test_comments_and_docstrings_are_found_but_code_is_not():
    source = 'def f():\n    """Made 2026-12-01."""\n    session = 1  # at 05:00 UTC\n    return "stop 3"\n'
    assert [n for n, t in docstring_lines(source) if hits(t)] == [2]
    assert [n for n, t in comment_lines(source) if hits(t)] == [3]


def test_readme_has_no_process_words():
    readme = ROOT / "README.md"
    bad = [
        f"README.md:{number}: {line.strip()[:120]}"
        for number, line in enumerate(readme.read_text(encoding="utf-8").splitlines(), 1)
        if hits(line)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("folder", CODE_FOLDERS)
def test_code_comments_and_docstrings_have_no_process_words(folder):
    bad = [line for path in python_files() if path.relative_to(ROOT).parts[0] == folder for line in offending_lines(path)]
    assert not bad, f"{len(bad)} lines:\n" + "\n".join(bad)
