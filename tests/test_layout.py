"""The package's layers: imports flow core -> integration -> bench -> commands, never back,
and no import cycle (docs/DESIGN.md, section 1)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "blocksparse"
# Layer of each top-level part of the package; a module may import its own layer or lower.
LAYERS = {"integration": 1, "bench": 2, "commands": 3, "__main__": 3}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def imports(path: Path, top_level_only: bool) -> set[str]:
    """blocksparse modules imported by the file (lazy imports in functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.startswith("blocksparse"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names
                             if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")).exists()
                             or (PACKAGE.parent / (f"{target}.{alias.name}".replace(".", "/") + ".py")).exists())
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("blocksparse"))
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(name):
    upward = sorted(t for t in imports(MODULES[name], top_level_only=False) if layer_of(t) > layer_of(name))
    assert not upward, f"{name} (layer {layer_of(name)}) imports {upward}"


def test_module_level_imports_have_no_cycle():
    graph = {name: {t for t in imports(path, top_level_only=True) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for target in sorted(graph[node]):
            # importing a submodule runs its package's __init__ first
            visit(target)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
