"""The layout rules a newcomer relies on, read from the source with `ast` (nothing is imported):
no import circle between the project's modules (function-level imports included), no module
reaching into another's `_private` names, modules and functions short enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "sft", "rlhf", "comparison")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 100


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    for path in ROOT.glob("*.py"):
        found[path.stem] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path):
    """-> [(imported module, [names], line)] for every project import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + [module])
            if module.split(".")[0] not in PACKAGES:
                continue
            names = [a.name for a in node.names]
            submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
            out.append((module, [n for n in names if f"{module}.{n}" not in MODULES], node.lineno))
            out += [(sub, [], node.lineno) for sub in submodules]
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        graph[name] = {m for m, _, _ in _imports(name, path) if m in MODULES and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_between_modules():
    assert _cycles(_graph()) == []


def _module_aliases(path: Path) -> dict[str, str]:
    """Local names bound to project modules: `from rlhf import ppo`, `import common.model.loss as loss`."""
    aliases = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            for a in node.names:
                if f"{node.module}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases[a.asname] = a.name
    return aliases


def test_no_module_imports_another_modules_private_names():
    crossing = []
    for name, path in MODULES.items():
        for module, names, line in _imports(name, path):
            crossing += [f"{path.relative_to(ROOT)}:{line}: {module}.{n}" for n in names
                         if n.startswith("_") and module != name]
        aliases = _module_aliases(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                crossing.append(f"{path.relative_to(ROOT)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert crossing == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_and_functions_stay_short(name):
    path = MODULES[name]
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} is too long"
    long_functions = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for node in ast.walk(ast.parse(source))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long_functions == [], f"{path.relative_to(ROOT)}"
