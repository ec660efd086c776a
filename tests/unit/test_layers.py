"""Imports point inward: core <- manager/store port <- adapters <- daemon <- cli/client."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "service" / "flowd"

# module prefix -> flowd modules it may import
ALLOWED: dict[str, tuple[str, ...]] = {
    "flowd.core": ("flowd.core",),
    "flowd.store.port": ("flowd.core",),
    "flowd.store.migrate": (),
    "flowd.store.memory": ("flowd.core", "flowd.store.port"),
    "flowd.store.postgres": ("flowd.core", "flowd.store.port", "flowd.store.migrate"),
    "flowd.manager": ("flowd.core", "flowd.store.port"),
    "flowd.embedded": (),
    "flowd.aio": (),
    "flowd.bus": ("flowd.core", "flowd.bus", "flowd.aio"),
    "flowd.config": ("flowd.bus.subjects",),
    "flowd.client": ("flowd.core", "flowd.bus"),
    "flowd.daemon": (
        "flowd.core",
        "flowd.manager",
        "flowd.store",
        "flowd.bus",
        "flowd.daemon",
        "flowd.aio",
        "flowd.config",
        "flowd.embedded",
    ),
}
FORBIDDEN_IN_CORE = {"asyncio", "asyncpg", "nats", "time", "random", "os", "socket"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(p for p in parts if p != "__init__")
        out.append((name, path))
    return out


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_imports_point_inward(module: str, path: Path) -> None:
    rule = next(
        (
            ALLOWED[p]
            for p in sorted(ALLOWED, key=len, reverse=True)
            if module == p or module.startswith(p + ".")
        ),
        None,
    )
    if rule is None:
        return  # the package root and cli/ may import anything inside
    for imported in _imports(path):
        if imported.startswith("flowd"):
            assert any(imported == a or imported.startswith(a + ".") for a in rule), (
                f"{module} must not import {imported}"
            )
        if module.startswith("flowd.core"):
            assert imported.split(".")[0] not in FORBIDDEN_IN_CORE, (
                f"core is pure: {module} imports {imported}"
            )


def test_core_imports_without_drivers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, flowd.core.apply, flowd.manager; "
        "sys.exit(int(any(m in sys.modules for m in ('asyncpg', 'nats'))))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
