"""The package's shape: no import cycle between edgekit's modules, no module over 500 lines, no stale import.

Every module is parsed with ``ast`` (never imported). The cycle check uses the imports that run when a module is
imported: its top-level statements, class bodies and ``try``/``if`` blocks, not function bodies and not
``if TYPE_CHECKING:`` blocks. Importing ``a.b.c`` also runs the packages ``a.b`` and ``a``, so those count too,
except the importer's own parent packages (already importing). Imports inside functions run later, on first use;
they may point back, but every ``edgekit`` import, anywhere, must name a module that exists.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "edgekit"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _walk(body, top: bool) -> Iterator[Tuple[ast.stmt, bool]]:
    """(import statement, runs at import time) for every import in ``body``, descending into every block."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, top
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from _walk(node.body, False)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _walk(node.body, False)
            yield from _walk(node.orelse, top)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _walk(getattr(node, field, []) or [], top)


def imports_of(name: str) -> List[Tuple[str, List[str], bool, int]]:
    """(absolute module, names imported from it, runs at import time, line) for each edgekit import of ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    package = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node, top in _walk(tree.body, True):
        if isinstance(node, ast.Import):
            out += [(a.name, [], top, node.lineno) for a in node.names if a.name.split(".")[0] == "edgekit"]
            continue
        if node.level:
            base = package.split(".")
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target.split(".")[0] == "edgekit":
            out.append((target, [a.name for a in node.names], top, node.lineno))
    return out


def _with_parents(target: str) -> Set[str]:
    parts = target.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def import_graph() -> Dict[str, Set[str]]:
    """module -> the edgekit modules its import runs (top-level imports only)."""
    graph: Dict[str, Set[str]] = {}
    for name in MODULES:
        own = _with_parents(name)
        edges: Set[str] = set()
        for target, names, top, _ in imports_of(name):
            if not top:
                continue
            hit = _with_parents(target) | {f"{target}.{n}" for n in names}  # `from pkg import submodule`
            edges |= {m for m in hit if m in MODULES and m not in own}
        graph[name] = edges
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_checker_sees_imports():
    graph = import_graph()
    assert "edgekit.config" in graph["edgekit.measure"] and "edgekit.errors" in graph["edgekit.config"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    graph = import_graph()
    cycles = find_cycles(graph)
    described = []
    for comp in cycles:
        members = set(comp)
        described.append("; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in comp))
    assert not cycles, "import cycles (top-level imports):\n" + "\n".join(described)


def test_every_edgekit_import_names_a_module():
    """Top-level or inside a function: a renamed module leaves no import behind that fails only when it runs."""
    stale = [f"{MODULES[name].relative_to(ROOT)}:{line} imports {target}"
             for name in MODULES for target, _, _, line in imports_of(name) if target not in MODULES]
    assert not stale, "\n".join(stale)


def test_no_module_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{p} ({n})" for p, n in sorted(long.items()))
