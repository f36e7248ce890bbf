"""Import graph of the profile_engine package: modules, layers (longest import path) and cycles.

Every import counts, also those inside functions (still a dependency at run time). Used by
tests/test_architecture.py; run it to see the picture: python scripts/import_graph.py [PACKAGE_DIR]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "profile_engine"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The package modules `path` imports (``from a import b`` counts b when b is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            submodules = [f"{module}.{alias.name}" for alias in node.names]
            # `from pkg import mod` depends on mod; `from pkg.mod import name` depends on pkg.mod
            targets = [t for t in submodules if t in known] or [module]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    paths = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    known = set(paths)
    result: dict[str, set[str]] = {}
    for name, path in paths.items():
        deps = imports_of(path, name, known)
        result[name] = {d for d in deps if d != PACKAGE}  # the package __init__ holds only the version
    return result


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def layers(edges: dict[str, set[str]]) -> dict[str, int]:
    """Layer of each module: 0 for no package imports, else 1 + the highest layer imported (cycles collapsed)."""
    component_of: dict[str, str] = {}
    for component in cycles(edges):
        for m in component:
            component_of[m] = component[0]
    memo: dict[str, int] = {}

    def depth(v: str, seen: frozenset[str]) -> int:
        key = component_of.get(v, v)
        if key in memo:
            return memo[key]
        members = [m for m, c in component_of.items() if c == key] or [v]
        deps = {component_of.get(d, d) for m in members for d in edges.get(m, ())} - {key}
        value = 0 if not deps else 1 + max(depth(d, seen | {key}) for d in deps if d not in seen)
        memo[key] = value
        return value

    return {m: depth(m, frozenset()) for m in edges}


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "include" / PACKAGE
    edges = graph(root)
    lay = layers(edges)
    found = cycles(edges)
    print(f"{len(edges)} modules, {max(lay.values()) + 1} layers, {len(found)} import cycles")
    for component in found:
        print("cycle:", " <-> ".join(component))
    for level in range(max(lay.values()) + 1):
        names = sorted(m.removeprefix(PACKAGE + ".") for m, v in lay.items() if v == level)
        print(f"layer {level}:", " ".join(names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
