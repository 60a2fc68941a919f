"""Print the shape of a checkout's `mllm` package: modules, lines, import cycles, imports hidden in functions,
who imports mlflow, and the longest chain of imports (the number of floors).

    python scripts/import_graph.py            # this checkout
    python scripts/import_graph.py ../before  # another one (a `git worktree add ../before <commit>`)

A pure AST scan (nothing from the package is imported), so it reads any commit. Imports at any depth count as
edges, `if TYPE_CHECKING:` blocks included. The AST helpers are tests/test_layout.py's (loaded from this checkout,
whichever checkout is scanned), which enforces the rules this only reports.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from functools import cache
from pathlib import Path
from types import ModuleType

LAYOUT = Path(__file__).resolve().parents[1] / "tests" / "test_layout.py"


def layout_helpers() -> ModuleType:
    """tests/test_layout.py, whose AST helpers (imports at any depth, mlflow imports, Tarjan's cycles) this reuses."""
    spec = importlib.util.spec_from_file_location("mllm_test_layout", LAYOUT)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    return helpers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).resolve().parents[1])
    root = parser.parse_args().root.resolve()
    layout = layout_helpers()
    files = {layout.module_name(p, root): p for p in sorted((root / "mllm").rglob("*.py"))}
    modules = set(files)
    lines = {m: len(p.read_text().splitlines()) for m, p in files.items()}
    packages = {m for m, p in files.items() if p.name == "__init__.py"}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    hidden = set()
    mlflow_users = set()
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for imp in layout.imports_of(module, tree, modules, packages):
            if imp.target in modules and imp.target != module:
                graph[module].add(imp.target)
                if not imp.top_level and module not in layout.LAZY_IMPORT_MODULES:
                    hidden.add((module, imp.line))
        if layout.mlflow_imports(module, tree):
            mlflow_users.add(module)
    groups = layout.cycle_groups(graph)

    @cache
    def chain(module: str, seen: frozenset[str] = frozenset()) -> tuple[str, ...]:
        """The longest import chain starting at `module` (cycles cut where they close)."""
        below = [chain(t, seen | {module}) for t in sorted(graph[module]) if t not in seen]
        return (module, *max(below, key=len, default=()))

    largest = max(lines, key=lines.get)
    folders: dict[str, list[str]] = {}
    for m in sorted(modules - packages):
        folders.setdefault(m.rpartition(".")[0], []).append(m.rpartition(".")[2])
    units = [(unit_lines(files[m]), m) for m in sorted(modules)]
    print(f"checkout: {root}")
    print(f"modules: {len(modules)}, lines: {sum(lines.values()):,}, largest: {largest} ({lines[largest]})")
    print("modules per folder: " + ", ".join(f"{f.replace('.', '/')}/ {len(ms)}" for f, ms in folders.items()))
    longest_unit = max(((n, f"{m}.{name}") for found, m in units for n, name in found), default=(0, "none"))
    print(f"largest unit (function or class): {longest_unit[1]} ({longest_unit[0]} lines)")
    over = [f"{m}.{name} ({n})" for found, m in units for n, name in found
            if n > (layout.MAX_CLASS_LINES if name[:1].isupper() else layout.MAX_FUNCTION_LINES)]
    limits = f"functions over {layout.MAX_FUNCTION_LINES} or classes over {layout.MAX_CLASS_LINES} lines"
    print(f"{limits}: {', '.join(over) or 'none'}")
    print(f"over 400 lines: {', '.join(f'{m} ({n})' for m, n in sorted(lines.items()) if n > 400) or 'none'}")
    print(f"import cycles: {len(groups)}" + "".join(f"\n  {' <-> '.join(g)}" for g in groups))
    lazy = ", ".join(sorted(layout.LAZY_IMPORT_MODULES))
    print(f"import statements of mllm modules inside functions/classes ({lazy} left out): {len(hidden)}")
    print(f"modules importing mlflow: {', '.join(sorted(mlflow_users))}")
    longest = max((chain(m) for m in sorted(modules)), key=len)
    print(f"longest import chain: {len(longest)} modules (floors): {' -> '.join(longest)}")


def unit_lines(path: Path) -> list[tuple[int, str]]:
    """(lines, name) of every function and class in a file, at any depth."""
    return [(node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


if __name__ == "__main__":
    main()
