"""Every import in actdiag points down the house (shared/STYLE.md): no module reaches, however indirectly, a module
that imports it back. Function-local imports count (they run too); imports under `if TYPE_CHECKING:` do not (they
never run)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "actdiag"

# `Report.save_json` / `Report.save_html` are the public API's doors to the sinks (shared/CONTRACT.md section 1): a
# record that writes itself calls up into reports/ by design, and so does one that shows itself in a notebook
# (`__repr__` / `_repr_html_`). Only those arrows are let through.
ALLOWED = {
    ("actdiag.records", "actdiag.reports.json"),
    ("actdiag.records", "actdiag.reports.html"),
    ("actdiag.records", "actdiag.reports.notebook"),
}


def module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imported(module: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """The actdiag modules that `module` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped = _type_checking_nodes(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # `from actdiag import rules` imports the module actdiag.rules; `from actdiag.x import f` imports actdiag.x.
            candidates = [f"{source}.{alias.name}" for alias in node.names] + [source]
        else:
            continue
        for name in candidates:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def import_graph() -> dict[str, set[str]]:
    known = module_names(PACKAGE)
    return {
        module: {target for target in imported(module, path, known) if (module, target) not in ALLOWED}
        for module, path in known.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import circle through each module that is on one, as the path of modules around it."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_circle_in_actdiag() -> None:
    graph = import_graph()
    assert {"actdiag.rules", "actdiag.fixes", "actdiag.inspection", "actdiag.monitor"} <= set(graph)
    assert cycles(graph) == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles(graph))


def test_rules_are_below_fixes_and_fixes_below_the_engine() -> None:
    graph = import_graph()
    rules = [m for m in graph if m == "actdiag.rules" or m.startswith("actdiag.rules.")]
    fixes = [m for m in graph if m == "actdiag.fixes" or m.startswith("actdiag.fixes.")]
    assert len(fixes) > 1  # a package: every module of it is checked, not only its __init__
    for module in rules:
        assert not {t for t in graph[module] if t in fixes}, module
    for module in fixes:
        assert "actdiag.inspection" not in graph[module], module
    assert "actdiag.fixes" in graph["actdiag.inspection"]  # verification gets the re-run function from the engine


def test_the_check_sees_function_local_imports_and_circles(tmp_path: Path) -> None:
    """The walker itself: a function-local import is an edge, a TYPE_CHECKING one is not, a circle is found."""
    probe = tmp_path / "a.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from actdiag import b\n"
        "def f():\n    import actdiag.c\n"
    )
    known = {"actdiag": probe, "actdiag.a": probe, "actdiag.b": probe, "actdiag.c": probe}
    assert set(imported("actdiag.a", probe, known)) == {"actdiag.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
