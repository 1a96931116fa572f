"""The shape of the code (docs/ARCHITECTURE.md), checked: import contracts, no import circles, small files.

Imports are read from the source with ``ast``: module-level imports count (also inside ``try`` and
plain ``if``), imports under ``if TYPE_CHECKING:`` and inside functions (lazy loading) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "anp_onnx"
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _top_level_imports(tree: ast.Module):
    """Import nodes executed when the module is imported (not in functions, not TYPE_CHECKING-only)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop(0)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [h for x in node.handlers for h in x.body]
        elif isinstance(node, (ast.With,)):
            todo += node.body


def _all_imports(tree: ast.Module):
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def _targets(node, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Fully qualified modules an import node loads."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{source}.{alias.name}"
        out.add(sub if sub in known else source)
    return out


def _library_files() -> list[Path]:
    return sorted(p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts)


def _graph() -> dict[str, set[str]]:
    files = _library_files()
    known = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        name = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        deps = set()
        for node in _top_level_imports(tree):
            deps |= _targets(node, name, path.name == "__init__.py", known)
        # a submodule import first runs its package's __init__: that is the package root's business
        graph[name] = {d for d in deps if d in known and d != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_library_has_no_import_circles():
    graph = _graph()
    assert "anp_onnx.api" in graph and "anp_onnx.context" in graph["anp_onnx.api"]  # the reader works
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_files_are_small(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.name} has {lines} lines (split it by stage or job)"


def test_the_library_never_imports_qt_or_the_gui():
    for path in _library_files():
        for node in _all_imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                assert not name.split(".")[0] in ("PySide6", "PyQt5", "PyQt6", "shiboken6", "gui"), (path, name)


def test_the_gui_uses_only_the_public_root():
    import anp_onnx

    public = set(anp_onnx.__all__)
    files = sorted((ROOT / "gui").rglob("*.py"))
    assert files
    for path in files:
        for node in _all_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.startswith("anp_onnx.")]
                assert not bad, f"{path.relative_to(ROOT)} imports {bad}: use the package root"
            elif node.module and node.module.split(".")[0] == "anp_onnx":
                assert node.module == "anp_onnx", f"{path.relative_to(ROOT)} imports from {node.module}"
                missing = [a.name for a in node.names if a.name not in public]
                assert not missing, f"{path.relative_to(ROOT)} imports non-public {missing}"


def test_the_gui_reads_only_public_names():
    import re

    import anp_onnx

    public = set(anp_onnx.__all__)
    for path in sorted((ROOT / "gui").rglob("*.py")):
        used = set(re.findall(r"\banp_onnx\.([A-Za-z_]\w*)", path.read_text(encoding="utf-8")))
        assert used <= public, f"{path.relative_to(ROOT)} uses non-public anp_onnx.{sorted(used - public)}"


def test_the_robustness_table_names_only_tests_that_exist():
    """docs/ROBUSTNESS.md names the test that shows each behaviour: each must exist."""
    import re

    doc = (ROOT / "docs" / "ROBUSTNESS.md").read_text(encoding="utf-8")
    named = sorted(set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", doc)))
    assert len(named) > 50
    missing = [f"{file}::{test}" for file, test in named
               if not re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(encoding="utf-8"), re.M)]
    assert not missing, f"docs/ROBUSTNESS.md names tests that do not exist: {missing}"
