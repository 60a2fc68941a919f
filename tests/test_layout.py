"""Layout rules checked on mllm's own source: who talks to MLflow, no import cycles, own imports at module level,
short modules, no private names borrowed across modules.

Pure AST/text scans, like test_safety.py: nothing from mllm is imported. Module names follow the files
(`mllm/config/schema.py` is `mllm.config.schema`, a package's `__init__.py` is the package itself); each failure
lists every offender as `module:line`.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "mllm").rglob("*.py"))
MLFLOW_PACKAGE = "mllm.tracking"  # runs, registry, artifacts, the Optuna storage and the pyfunc model MLflow serves
LAZY_IMPORT_MODULES = {"mllm.cli"}  # imports inside commands keep `mllm --help` instant
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_CLASS_LINES = 150
MAX_TOP_MODULES = 15  # the stages, the CLI and the bottom floor; every other concern has its folder
NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SOURCES}
PACKAGES = {module_name(p) for p in SOURCES if p.name == "__init__.py"}


class Import(NamedTuple):
    line: int
    target: str  # the mllm module the statement imports: the edge of the import graph
    name: str | None  # `from base import name`: the name; None for `import mllm.x`
    bound: str  # the local name the statement binds
    bound_module: str | None  # the module that local name refers to, when it is one
    top_level: bool  # not inside a function, class or lambda (module-level `if`/`try` blocks count as top level)
    statement: str  # the import statement, for messages


def is_own(name: str) -> bool:
    return name == "mllm" or name.startswith("mllm.")


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@cache
def tree_of(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(), str(MODULES[module]))


def walk(node: ast.AST, nested: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below `node`, with whether it sits inside a function, class or lambda."""
    for child in ast.iter_child_nodes(node):
        yield child, nested
        yield from walk(child, nested or isinstance(child, NESTED))


def from_base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = (module if is_package else module.rpartition(".")[0]).split(".")
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join([*parts, *([node.module] if node.module else [])])


def imports_of(module: str, tree: ast.Module, modules: Collection[str], packages: Collection[str]) -> list[Import]:
    """Every import of an mllm module in `tree`, at any depth."""
    found = []
    for node, nested in walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_own(alias.name):
                    bound = alias.asname or alias.name.partition(".")[0]
                    bound_module = alias.name if alias.asname else bound
                    found.append(
                        Import(node.lineno, alias.name, None, bound, bound_module, not nested, ast.unparse(node))
                    )
        elif isinstance(node, ast.ImportFrom):
            base = from_base(module, module in packages, node)
            if not is_own(base):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = sub in modules
                found.append(
                    Import(
                        node.lineno,
                        sub if is_module else base,
                        alias.name,
                        alias.asname or alias.name,
                        sub if is_module else None,
                        not nested,
                        ast.unparse(node),
                    )
                )
    return found


def imports(module: str) -> list[Import]:
    return imports_of(module, tree_of(module), MODULES, PACKAGES)


def mlflow_imports(module: str, tree: ast.Module) -> list[str]:
    """Every `import mlflow...` / `from mlflow... import ...` in `tree`, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(name == "mlflow" or name.startswith("mlflow.") for name in names):
            found.append(f"{module}:{node.lineno}: {ast.unparse(node)}")
    return sorted(found, key=line_order)


def import_graph(modules: Collection[str]) -> dict[str, dict[str, int]]:
    """module -> {imported mllm module: line of its first import}, imports at any depth (functions and
    `if TYPE_CHECKING:` blocks included), self-imports left out."""
    graph: dict[str, dict[str, int]] = {}
    for module in modules:
        edges = graph.setdefault(module, {})
        for imp in imports(module):
            if imp.target != module:
                edges.setdefault(imp.target, imp.line)
    return graph


def cycle_groups(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(groups)


def shortest_cycle(graph: Mapping[str, Collection[str]], start: str) -> list[str]:
    """The shortest path start -> ... -> start (BFS), or [] when there is none."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return []


def private_uses(module: str, tree: ast.Module, modules: Collection[str], packages: Collection[str]) -> list[str]:
    """`from mllm.x import _name` and `x._name` (`x` bound by an import of an mllm module), `x` not `module` itself.

    A private submodule (`from mllm.x import _impl`, `mllm.x._impl`) is a module, not a name defined in one: allowed.
    """
    own = imports_of(module, tree, modules, packages)
    found = [
        f"{module}:{imp.line}: from {imp.target} import {imp.name}"
        for imp in own
        if imp.name and is_private(imp.name) and imp.bound_module is None and imp.target != module
    ]
    aliases = {imp.bound: imp.bound_module for imp in own if imp.bound_module}

    def module_of(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = module_of(node.value)
            return f"{owner}.{node.attr}" if owner and f"{owner}.{node.attr}" in modules else None
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = module_of(node.value)
            if owner and owner != module and f"{owner}.{node.attr}" not in modules:
                found.append(f"{module}:{node.lineno}: {ast.unparse(node)} (a private name of {owner})")
    return sorted(found, key=line_order)


def line_order(offender: str) -> tuple[str, int]:
    module, line, _ = offender.split(":", 2)
    return module, int(line)


def report(title: str, offenders: list[str]) -> str:
    return f"{title} ({len(offenders)}):\n  " + "\n  ".join(offenders)


def test_the_scan_sees_the_package() -> None:
    assert len(MODULES) > 20, sorted(MODULES)
    assert "mllm" in PACKAGES and "mllm.cli" in MODULES
    assert sum(len(edges) for edges in import_graph(MODULES).values()) > 20


def test_the_helpers_catch_what_they_should() -> None:
    source = """
from __future__ import annotations
import typing
from typing import TYPE_CHECKING
import mllm.x.y as deep
from . import sibling, helper  # helper: a name defined in the package, so the edge goes to the package
from .. import x
from ..x import _hidden, y
if TYPE_CHECKING:
    from mllm.pkg.other import Thing
def f() -> "mllm.pkg.other.Thing":
    import mllm
    "from mllm.x import y"
    return deep._secret, sibling._inner, x.y._z, mllm.x._w, typing._T
"""
    modules = {"mllm", "mllm.x", "mllm.x.y", "mllm.pkg", "mllm.pkg.mod", "mllm.pkg.sibling", "mllm.pkg.other"}
    tree = ast.parse(source)
    found = imports_of("mllm.pkg.mod", tree, modules, {"mllm", "mllm.x", "mllm.pkg"})
    assert [(i.line, i.target, i.top_level) for i in found] == [
        (5, "mllm.x.y", True),
        (6, "mllm.pkg.sibling", True),
        (6, "mllm.pkg", True),
        (7, "mllm.x", True),
        (8, "mllm.x", True),
        (8, "mllm.x.y", True),
        (10, "mllm.pkg.other", True),
        (12, "mllm", False),
    ]
    assert [u.split(" (")[0] for u in private_uses("mllm.pkg.mod", tree, modules, {"mllm", "mllm.x", "mllm.pkg"})] == [
        "mllm.pkg.mod:8: from mllm.x import _hidden",
        "mllm.pkg.mod:14: deep._secret",
        "mllm.pkg.mod:14: sibling._inner",
        "mllm.pkg.mod:14: x.y._z",
        "mllm.pkg.mod:14: mllm.x._w",
    ]
    mlflow_source = """
import mlflow_utils
import os, mlflow.pyfunc
def f():
    from mlflow import Client
    "import mlflow"
"""
    assert mlflow_imports("m", ast.parse(mlflow_source)) == [
        "m:3: import os, mlflow.pyfunc",
        "m:5: from mlflow import Client",
    ]
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e"}}
    assert cycle_groups(graph) == [["a", "b", "c"]]
    assert shortest_cycle(graph, "a") == ["a", "b", "c", "a"]
    assert shortest_cycle(graph, "d") == []


def test_only_the_tracking_package_talks_to_mlflow() -> None:
    offenders = [
        found
        for module in sorted(MODULES)
        if module != MLFLOW_PACKAGE and not module.startswith(MLFLOW_PACKAGE + ".")
        for found in mlflow_imports(module, tree_of(module))
    ]
    assert not offenders, report(f"mlflow imported outside {MLFLOW_PACKAGE}", offenders)


def test_import_graph_has_no_cycle() -> None:
    graph = import_graph(MODULES)
    groups = cycle_groups(graph)
    lines = []
    for group in groups:
        cycle = shortest_cycle(graph, group[0])
        inside = [f"{a}:{line} -> {b}" for a in group for b, line in sorted(graph[a].items()) if b in group]
        lines.append(f"{' -> '.join(cycle)}\n    (all imports among {', '.join(group)}: {'; '.join(inside)})")
    assert not groups, report("import cycles between mllm modules (imports inside functions count)", lines)


def test_own_imports_at_module_level() -> None:
    offenders = {
        f"{module}:{imp.line}: {imp.statement}": None  # one line per statement, in order
        for module in sorted(MODULES)
        if module not in LAZY_IMPORT_MODULES
        for imp in imports(module)
        if not imp.top_level
    }
    assert not offenders, report("mllm imports inside functions or classes (move them to the top)", [*offenders])


def test_no_module_over_400_lines() -> None:
    counts = {module: len(path.read_text().splitlines()) for module, path in MODULES.items()}
    offenders = [f"{m}: {n} lines" for m, n in sorted(counts.items()) if n > MAX_LINES]
    assert not offenders, report(f"modules over {MAX_LINES} lines", offenders)


def test_no_private_names_across_modules() -> None:
    offenders = [use for module in sorted(MODULES) for use in private_uses(module, tree_of(module), MODULES, PACKAGES)]
    assert not offenders, report("private names used outside their module", offenders)


def long_units(module: str, tree: ast.Module) -> list[str]:
    """Functions over MAX_FUNCTION_LINES and classes over MAX_CLASS_LINES lines (decorators left out), at any depth."""
    found = []
    for node in ast.walk(tree):
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{module}:{node.lineno}: {node.name} is {length} lines (at most {limit})")
    return sorted(found, key=line_order)


def top_modules(modules: Collection[str]) -> list[str]:
    """The modules directly under `mllm/` (subpackages count as folders, not modules)."""
    return sorted(m for m in modules if m.count(".") == 1 and m not in PACKAGES)


def test_no_long_functions_or_classes() -> None:
    offenders = [unit for module in sorted(MODULES) for unit in long_units(module, tree_of(module))]
    assert not offenders, report("units too long to read in one screen", offenders)


def test_the_folders_hold_the_concerns() -> None:
    top = top_modules(MODULES)
    assert len(top) <= MAX_TOP_MODULES, report(f"modules at the top of mllm/ (at most {MAX_TOP_MODULES})", top)
    assert top_modules({"mllm", "mllm.cli", "mllm.x", "mllm.x.y"} - PACKAGES | {"mllm.x"}) == ["mllm.cli", "mllm.x"]


def test_the_unit_scan_measures_lines() -> None:
    source = "def short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES + "\n"
    assert long_units("m", ast.parse(source)) == [f"m:5: long is {MAX_FUNCTION_LINES + 1} lines (at most 60)"]


def client_uses(module: str, tree: ast.Module) -> list[str]:
    """`<anything>.client` attribute reads: the MLflow client a Store holds, for the tracking package only."""
    return sorted((f"{module}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
                   if isinstance(node, ast.Attribute) and node.attr == "client"), key=line_order)


def test_only_the_tracking_package_reaches_the_mlflow_client() -> None:
    offenders = [use for module in sorted(MODULES) if not module.startswith(MLFLOW_PACKAGE)
                 for use in client_uses(module, tree_of(module))]
    assert not offenders, report("the MLflow client reached outside mllm.tracking (add a Store method)", offenders)
    assert client_uses("m", ast.parse("store.client.get_run(x)\nclient = 1")) == ["m:1: store.client"]
