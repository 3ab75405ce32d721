"""The import graph of moemesh's packages, read from the source (nothing is imported).

    python -m tests.import_graph      # prints each package and what it imports (`make imports`)

`tests/unit/test_layers.py` asserts the layering the README states on this graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protos", "router", "experts", "services", "client", "deploy")
GENERATED = ("_pb2.py", "_pb2_grpc.py")


def source_files(package: str) -> Iterator[Path]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if not path.name.endswith(GENERATED):
            yield path


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "moemesh." + ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, at any depth (lazy imports count too)."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def package_imports(package: str) -> dict[str, set[str]]:
    """{module of `package`: the modules it imports}."""
    return {_module_of(p): imports_of(p) for p in source_files(package)}


def package_of(name: str) -> str | None:
    """ "moemesh.router.gating" -> "router"; None for a module outside moemesh."""
    parts = name.split(".")
    return parts[1] if parts[0] == "moemesh" and len(parts) > 1 and parts[1] in PACKAGES else None


def package_graph() -> dict[str, set[str]]:
    """{package: the other moemesh packages it imports}."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        deps = {package_of(n) for imported in package_imports(package).values() for n in imported}
        graph[package] = {d for d in deps if d is not None and d != package}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of packages as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep] if dep in path else [node, dep]
            if dep not in state and (cycle := visit(dep, [*path, dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


if __name__ == "__main__":
    for package, deps in package_graph().items():
        print(f"{package:9s} -> {', '.join(sorted(deps)) or '-'}")
    cycle = find_cycle(package_graph())
    print("no package cycle" if cycle is None else f"cycle: {' -> '.join(cycle)}")
