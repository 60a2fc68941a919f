"""Print the shape of a checkout's `mllm` package: modules, lines, import cycles, imports hidden in functions,
who imports mlflow, and the longest chain of imports (the number of floors).

    python scripts/import_graph.py            # this checkout
    python scripts/import_graph.py ../before  # another one (a `git worktree add ../before <commit>`)

A pure AST scan (nothing from the package is imported), so it reads any commit. Imports at any depth count as
edges, `if TYPE_CHECKING:` blocks included; tests/test_layout.py enforces the rules this only reports.
"""

from __future__ import annotations

import argparse
import ast
from functools import cache
from pathlib import Path


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def own_imports(module: str, is_package: bool, tree: ast.Module,
                modules: set[str]) -> list[tuple[str, bool, ast.stmt]]:
    """(imported mllm module, inside a function or class, the statement) for every import of mllm's modules."""
    found = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
            if isinstance(child, ast.Import):
                found.extend((a.name, nested, child) for a in child.names if a.name.split(".")[0] == "mllm")
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = (module if is_package else module.rpartition(".")[0]).split(".")
                    parts = parts[: len(parts) - (child.level - 1)]
                    base = ".".join([*parts, *([child.module] if child.module else [])])
                if base.split(".")[0] == "mllm":
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        found.append((sub if sub in modules else base, nested, child))
            visit(child, inner)

    visit(tree, False)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                groups.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    root = parser.parse_args().root.resolve()
    files = {module_name(root, p): p for p in sorted((root / "mllm").rglob("*.py"))}
    modules = set(files)
    lines = {m: len(p.read_text().splitlines()) for m, p in files.items()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    hidden = []
    mlflow_users = set()
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, nested, statement in own_imports(module, path.name == "__init__.py", tree, modules):
            if target in modules and target != module:
                graph[module].add(target)
                if nested and module != "mllm.cli" and statement not in hidden:
                    hidden.append(statement)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n.split(".")[0] == "mlflow" for n in names):
                mlflow_users.add(module)
    groups = cycles(graph)

    @cache
    def chain(module: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The longest import chain starting at `module` (cycles cut where they close)."""
        below = [chain(t, seen | {module}) for t in sorted(graph[module]) if t not in seen]
        return (module, *max(below, key=len, default=()))

    largest = max(lines, key=lines.get)
    print(f"checkout: {root}")
    print(f"modules: {len(modules)}, lines: {sum(lines.values()):,}, largest: {largest} ({lines[largest]})")
    print(f"over 400 lines: {', '.join(f'{m} ({n})' for m, n in sorted(lines.items()) if n > 400) or 'none'}")
    print(f"import cycles: {len(groups)}" + "".join(f"\n  {' <-> '.join(g)}" for g in groups))
    print(f"import statements of mllm modules inside functions/classes (cli.py left out): {len(hidden)}")
    print(f"modules importing mlflow: {', '.join(sorted(mlflow_users))}")
    longest = max((chain(m) for m in sorted(modules)), key=len)
    print(f"longest import chain: {len(longest)} modules (floors): {' -> '.join(longest)}")


if __name__ == "__main__":
    main()
