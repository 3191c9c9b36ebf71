"""The layers import one way: ``csrc`` <- ``attnres`` (torch only) <- ``lightning_modules`` <- configs and
benchmarks. Read from the source (the AST of every module, imports inside functions included), not from
what a test run happens to import:

* nothing under ``attnres/`` imports Lightning, ``lightning_modules`` or jsonargparse;
* the modules of ``attnres`` and ``lightning_modules`` form no import circle (every circle is listed);
* no module of either package is over ``MAX_LINES`` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "attnres"
PACKAGES = (LIBRARY, "lightning_modules")
# what the library must not reach: the application layer and its frameworks
FORBIDDEN_IN_LIBRARY = {"lightning", "lightning_fabric", "pytorch_lightning", "lightning_modules",
                        "jsonargparse"}
MAX_LINES = 600


def module_name(path: Path) -> str:
    """``attnres/bench/ops.py`` -> ``attnres.bench.ops``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports(path: Path, name: str) -> list[tuple[str, int, str | None]]:
    """Every module ``path`` imports, at any depth: ``(module, line, parent)``. ``import a.b`` and
    ``importlib.import_module("a.b")`` / ``__import__("a.b")`` with a literal name give ``a.b``;
    ``from a import b`` gives ``a.b`` with the parent ``a``, the module meant where ``b`` is a name in it
    rather than a submodule. Relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, str | None]] = []
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    # imports under ``if TYPE_CHECKING:`` are for annotations only: they never run, so they make no circle
    typing_only = {
        id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
        for stmt in node.body for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(f"{base}.{alias.name}", node.lineno, base) for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno, None))
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> dict[str, set[str]]:
    """Module -> the modules of the two packages it imports (a compiled extension such as ``attnres._C``
    and other packages' modules are no nodes). Importing ``a.b.c`` also runs the ``__init__`` of ``a``
    and ``a.b``: those count too, except the importer's own enclosing packages (already being imported
    when it runs), so ``attnres.ops`` importing ``attnres.model.norm`` depends on ``attnres.model``."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for target, _, parent in imports(path, name):
            if target not in known and parent is not None:
                target = parent
            if target not in known:
                continue
            parts = target.split(".")
            for prefix in (".".join(parts[:k]) for k in range(1, len(parts) + 1)):
                if prefix in known and prefix != name and not name.startswith(prefix + "."):
                    targets.add(prefix)
        edges[name] = targets
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: every strongly connected component of more than one module (or a module that
    imports itself), each sorted, found by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                found.append(sorted(component))

    for start in sorted(edges):
        if start not in index:
            connect(start)
    return sorted(found)


def test_the_library_imports_no_lightning_lightning_modules_or_jsonargparse() -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {target}"
        for name, path in modules().items() if name.split(".")[0] == LIBRARY
        for target, line, _ in imports(path, name) if target.split(".")[0] in FORBIDDEN_IN_LIBRARY
    ]
    assert not bad, "the library (torch only) reaches up into the application:\n" + "\n".join(bad)


def test_no_import_circle_between_the_modules_of_the_two_packages() -> None:
    found = circles(graph())
    assert not found, "import circles (modules that import each other, directly or not):\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_the_circle_finder_sees_every_circle_and_the_graph_its_edges() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}, "g": {"g"}}
    assert circles(edges) == [["a", "b", "c"], ["d", "e"], ["g"]]
    assert circles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    edges = graph()
    assert f"{LIBRARY}.bench.e2e" in edges["lightning_modules.bench_template"]
    assert "lightning_modules.bench_template" in edges["lightning_modules.main"]  # a function-level import
    # attnres.residual.state names the block's bookkeeping type under TYPE_CHECKING only: no edge
    assert f"{LIBRARY}.residual.block" not in edges[f"{LIBRARY}.residual.state"]
    assert f"{LIBRARY}.residual.state" in edges[f"{LIBRARY}.residual.block"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_over_the_line_limit(package: str) -> None:
    sizes = {p: len(p.read_text(encoding="utf-8").splitlines()) for p in (ROOT / package).rglob("*.py")}
    over = sorted(f"{p.relative_to(ROOT)}: {n} lines" for p, n in sizes.items() if n > MAX_LINES)
    assert not over, f"over {MAX_LINES} lines (split by concern):\n" + "\n".join(over)
