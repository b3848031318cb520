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
    "nacl": {"mesh/identity.py"},
    "networkx": {"mesh/routing.py"},
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
    missing = [str(p.relative_to(ROOT)) for p in sources()
               if p.name != "__init__.py" and not ast.get_docstring(ast.parse(p.read_text()))]  # fmt: skip
    assert not missing, f"modules without a docstring: {missing}"


def test_modules_stay_under_the_size_cap() -> None:
    big = {str(p.relative_to(ROOT)): n for p in sources()
           if (n := len(p.read_text().splitlines())) > 800}  # fmt: skip
    assert not big, f"modules over 800 lines: {big}"


@pytest.mark.parametrize("package", ["mesh", "mesh.transport", "atoms"])
def test_package_exports_resolve(package: str) -> None:
    import importlib

    mod = importlib.import_module(package)
    names = getattr(mod, "__all__", None) or [n for n in vars(mod) if not n.startswith("_")]
    for name in names:
        assert getattr(mod, name) is not None, f"{package}.{name}"
