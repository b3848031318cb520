"""The architecture's rules, checked on the source: layering and one home per library."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("nexusd", "mesh", "atoms")

# library -> the only modules allowed to import it
HOMES = {
    "libp2p": {"mesh/transport/libp2p.py"},
    "msgpack": {"mesh/wire.py"},
    "nacl": {"mesh/identity/_nacl.py"},
    "networkx": {"mesh/routing.py"},
    "hypercorn": {"nexusd/http/server.py"},
    "jinja2": {"nexusd/chat_template.py"},
}
# package -> top-level imports it must never make
FORBIDDEN = {
    "mesh": {"torch", "nexusd", "atoms"},
    "atoms": {"trio", "libp2p", "mesh", "nexusd"},
    "nexusd": set(),
}
NOWHERE = {"asyncio", "anyio", "pickle"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_respects_layering(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    found = imports_of(path)
    package = rel.split("/")[0]
    assert not found & FORBIDDEN[package], f"{rel} imports {found & FORBIDDEN[package]}"
    assert not found & NOWHERE, f"{rel} imports {found & NOWHERE}"
    for lib, homes in HOMES.items():
        if lib in found:
            assert rel in homes, f"{rel} imports {lib}; only {sorted(homes)} may"


def test_every_module_declares_its_rules() -> None:
    missing = [
        str(p.relative_to(ROOT))
        for p in sources()
        if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, f"modules without a docstring: {missing}"


def test_modules_stay_under_the_size_cap() -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in sources()
        if (n := len(p.read_text().splitlines())) > 800
    }
    assert not big, f"modules over 800 lines: {big}"


@pytest.mark.parametrize("package", ["mesh", "mesh.transport", "atoms"])
def test_package_exports_resolve(package: str) -> None:
    import importlib

    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    for name in names:
        assert getattr(mod, name) is not None, f"{package}.{name}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module loads: module level, outside `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If):
                test = node.test
                name = test.attr if isinstance(test, ast.Attribute) else getattr(test, "id", "")
                if name != "TYPE_CHECKING":
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody):
                    visit(block)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports at load time (most specific module named)."""
    paths = {_module_name(p): p for p in sources()}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names
                ]
            for target in targets:
                while target and target not in paths:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_import_graph_is_acyclic() -> None:
    graph = import_graph()
    assert "nexusd.cli.app" in graph["nexusd.cli"], "the graph builder lost relative imports"
    assert "mesh.wire" in graph["nexusd.api.records"], "the graph builder lost absolute imports"
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
