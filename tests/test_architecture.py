"""The storeys of ``docs/architecture.md`` hold: no import reaches a higher storey; every module is placed.

The imports are read with ``ast`` (nothing is imported): module-level imports (what runs at import
time, class bodies included) must stay on the importer's storey or below; a lazy import (inside a
function) may go up only where the doc's table of lazy imports says why. ``kernels/`` never imports
``nflow_np``, and each of its folders names the reference it replaces and its tests.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
ROOT = "nflow_np"
"""The root package: Python runs it before any of its modules, so an import of it is not counted."""


def module_name(path: Path) -> str:
    """``nflow_np/flows/base.py`` → ``nflow_np.flows.base``; ``nflow_np/flows/__init__.py`` → ``nflow_np.flows``."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted((REPO / ROOT).rglob("*.py"))}


def read_storeys(text: str) -> tuple[dict[str, int], dict[tuple[str, str], str]]:
    """The doc's storey of each module, and its lazy imports that go up: ``{(importer, imported): why}``."""
    storeys, lazy, storey, duplicates = {}, {}, None, []
    for line in text.splitlines():
        heading = re.match(r"## Storey (\d+)\b", line)
        if heading:
            storey = int(heading.group(1))
        elif line.startswith("## "):
            storey = None
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("| `") else []
        paths = [re.fullmatch(r"`(nflow_np/[\w/]+\.py)`", cell) for cell in cells]
        if storey is not None and paths and paths[0]:
            name = module_name(REPO / paths[0].group(1))
            if name in storeys:
                duplicates.append(name)
            storeys[name] = storey
        elif storey is None and len(paths) == 3 and paths[0] and paths[1] and cells[2]:
            lazy[module_name(REPO / paths[0].group(1)), module_name(REPO / paths[1].group(1))] = cells[2]
    assert not duplicates, f"placed on more than one storey: {duplicates}"
    return storeys, lazy


def imports_of(source: str, name: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """The modules of ``modules`` that the module ``name`` imports: ``(at import time, lazily)``.

    ``from a import b`` names ``a.b`` when that is a module, else ``a``; relative imports are resolved;
    importing ``a.b.c`` also runs the package ``a.b`` (counted, unless it is a package of ``name`` itself,
    which ran before ``name``), and the root package (not counted); imports under ``if TYPE_CHECKING:``
    never run and are skipped.
    """
    package = name if _is_package(name, modules) else name.rpartition(".")[0]  # what ``from .`` means
    at_import, lazy = set(), set()

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([node.module] if node.module else [])])
        return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]

    def add(found: set[str], target: str) -> None:
        parts = target.split(".")
        for end in range(2, len(parts) + 1):  # the packages on the way, then the module (the root not counted)
            prefix = ".".join(parts[:end])
            if prefix in modules and prefix != name and not name.startswith(prefix + "."):  # own packages ran first
                found.add(prefix)

    def visit(node: ast.AST, inside_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for orelse in child.orelse:
                    visit(ast.Module(body=[orelse], type_ignores=[]), inside_function)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in targets(child):
                    add(lazy if inside_function else at_import, target)
            visit(child, inside_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda))

    visit(ast.parse(source), False)
    return at_import, lazy - at_import


def _is_package(name: str, modules: set[str]) -> bool:
    return any(other.startswith(name + ".") for other in modules)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def upward(storeys: dict[str, int], edges: dict[str, set[str]]) -> set[tuple[str, str]]:
    """The ``(importer, imported)`` pairs whose imported module stands on a higher storey.

    A module on no storey is left out here: the placement test names it.
    """
    placed = {(m, t) for m, targets in edges.items() for t in targets if m in storeys and t in storeys}
    return {(m, t) for m, t in placed if storeys[t] > storeys[m]}


MODULES = package_modules()
STOREYS, LAZY_UP = read_storeys(DOC.read_text(encoding="utf-8"))
IMPORTS = {name: imports_of(path.read_text(encoding="utf-8"), name, set(MODULES)) for name, path in MODULES.items()}


def test_every_module_of_the_package_is_placed_on_one_storey() -> None:
    missing = sorted(set(MODULES) - set(STOREYS))
    stale = sorted(set(STOREYS) - set(MODULES))
    assert not missing, f"place these modules on a storey in docs/architecture.md: {missing}"
    assert not stale, f"docs/architecture.md places modules that do not exist: {stale}"


def test_no_import_at_import_time_reaches_a_higher_storey() -> None:
    found = upward(STOREYS, {name: at_import for name, (at_import, _) in IMPORTS.items()})
    described = [f"{m} (storey {STOREYS[m]}) imports {t} (storey {STOREYS[t]})" for m, t in sorted(found)]
    assert not described, "\n".join(described)


def test_a_lazy_import_reaches_up_only_where_the_doc_says_why() -> None:
    found = upward(STOREYS, {name: lazy for name, (_, lazy) in IMPORTS.items()})
    unexplained = sorted(found - set(LAZY_UP))
    assert not unexplained, f"lazy imports up a storey, not in docs/architecture.md's table: {unexplained}"
    stale = sorted(set(LAZY_UP) - found)
    assert not stale, f"docs/architecture.md lists lazy imports up a storey that no longer exist: {stale}"


def test_kernels_never_import_nflow_np() -> None:
    modules = {module_name(path) for path in (REPO / "kernels").rglob("*.py")}
    offenders = []
    for path in sorted((REPO / "kernels").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] == ROOT]
    assert modules and not offenders, offenders


@pytest.mark.parametrize(
    ("source", "name", "expected"),
    [
        ("from nflow_np.cli import main\n", "nflow_np.backend", ({"nflow_np.cli"}, set())),
        ("def f():\n    from nflow_np import plots\n", "nflow_np.density", (set(), {"nflow_np.plots"})),
        ("class A:\n    from nflow_np.flows.base import Flow\n", "nflow_np.module",
         ({"nflow_np.flows", "nflow_np.flows.base"}, set())),
        ("from . import coupling\nfrom ..nn import mlp\n", "nflow_np.flows.base",
         ({"nflow_np.flows.coupling", "nflow_np.nn", "nflow_np.nn.mlp"}, set())),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nflow_np.model import FlowModel\n",
         "nflow_np.specs", (set(), set())),
        ("import nflow_np\nfrom nflow_np import __version__\n", "nflow_np.provenance", (set(), set())),
    ],
)
def test_the_reader_finds_what_runs_when(source: str, name: str, expected: tuple[set[str], set[str]]) -> None:
    """The checks above can fail: an import up a storey, at import time or lazily, is seen as such."""
    assert imports_of(source, name, set(MODULES)) == expected


def test_an_import_up_a_storey_is_reported() -> None:
    at_import, _ = imports_of("from nflow_np.cli import main\n", "nflow_np.backend", set(MODULES))
    assert upward(STOREYS, {"nflow_np.backend": at_import}) == {("nflow_np.backend", "nflow_np.cli")}
    assert upward(STOREYS, {"nflow_np.cli": {"nflow_np.backend"}}) == set()


KERNEL_FOLDERS = sorted(path.parent for path in (REPO / "kernels").glob("*/__init__.py"))


@pytest.mark.parametrize("folder", KERNEL_FOLDERS, ids=lambda folder: folder.name)
def test_each_kernel_folder_names_its_reference_its_modules_and_its_tests(folder: Path) -> None:
    """``kernels/<operation>/__init__``'s docstring points at the NumPy reference (a file and a function of it
    that exist), names every module of the folder, and the folder's tests in ``tests/kernels/<operation>/``."""
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8"))) or ""
    modules = sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__")
    assert modules and all(f"``{name}``" in doc for name in modules), (folder.name, modules)
    tests = REPO / "tests" / "kernels" / folder.name
    assert f"tests/kernels/{folder.name}/" in doc and any(tests.glob("test_*.py")), folder.name
    if folder.name == "common":  # shared helpers: their reference is NumPy's own exp/tanh
        return
    references = re.findall(r"``(nflow_np/[\w/]+\.py)``, (?:class|classes|function|functions) ([^;]+?);", doc)
    assert references, f"kernels/{folder.name}: name the reference as ``nflow_np/<file>.py``, function(s) ``...``;"
    for reference, functions in references:
        source = (REPO / reference).read_text(encoding="utf-8")
        for function in re.findall(r"``(\w+)``", functions):
            assert re.search(rf"^\s*(?:def|class) {function}\b", source, flags=re.M), (reference, function)
