"""The README's *Reliability* checklist: every promise names tests, and every test it names exists.

A line ``- [x] claim — `tests/file.py::test_name`, …`` is a promise; ``- [ ]`` lines say what is not
covered. This keeps the list from naming a test that was renamed or removed (then it would promise
something no test holds).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def reliability_items() -> list[tuple[bool, str]]:
    """``(promised, text)`` of every checklist item of the section, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Reliability\n", 1)[1].split("\n## ", 1)[0]
    items: list[tuple[bool, str]] = []
    for line in section.splitlines():
        if line.startswith(("- [x] ", "- [ ] ")):
            items.append((line.startswith("- [x]"), line[6:]))
        elif line.startswith("  ") and items:
            items[-1] = (items[-1][0], items[-1][1] + " " + line.strip())
    return items


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_promise_names_tests_that_exist() -> None:
    items = reliability_items()
    promises = [text for promised, text in items if promised]
    assert len(promises) >= 40 and any(not promised for promised, _ in items)
    for text in promises:
        named = re.findall(r"`(tests/[\w/]+\.py)::(test_\w+)`", text)
        assert named, f"a promise without a test: {text[:80]}"
        for path, name in named:
            assert (REPO / path).is_file(), f"{path} does not exist ({text[:60]})"
            assert name in functions_in(REPO / path), f"{path} has no {name} ({text[:60]})"
