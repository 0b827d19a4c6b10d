"""The package's layering stays true: the Linux layer imports nothing above it, nothing imports the
plugin module, no import cycles, no project import hidden inside a function to dodge one."""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "pytest_sandbox"
LINUX_MAY_IMPORT = ("pytest_sandbox.linux", "pytest_sandbox.layers.format", "pytest_sandbox.errors")
THIRD_PARTY_ABOVE_LINUX = ("pytest", "_pytest", "pluggy", "pyroute2", "filelock")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """(absolute module imported, at module level?) for every import in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, id(node) in top_level) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [f"{module}.{alias.name}" for alias in node.names]
            # ``from . import x`` imports the module x; ``from .m import f`` imports m
            targets = [n for n in names if _is_project_module(n)] or [module]
            found.extend((t, id(node) in top_level or _under_type_checking(tree, node)) for t in targets)
    return found


def _under_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING":
            if any(child is node for child in ast.walk(stmt)):
                return True
    return False


def _is_project_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {
    name: sorted({m for m, top in _imports(path) if m.startswith("pytest_sandbox") and m != name and top})
    for name, path in MODULES.items()
}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("pytest_sandbox.linux")))
def test_linux_layer_imports_nothing_above_it(module: str) -> None:
    for imported, _ in _imports(MODULES[module]):
        if imported.startswith("pytest_sandbox"):
            assert imported.startswith(LINUX_MAY_IMPORT), f"{module} imports {imported}"
        else:
            assert imported.split(".")[0] not in THIRD_PARTY_ABOVE_LINUX, f"{module} imports {imported}"


def test_image_format_imports_nothing_of_the_project() -> None:
    assert GRAPH["pytest_sandbox.layers.format"] == []


def test_nothing_imports_the_plugin_module() -> None:
    importers = [name for name, imported in GRAPH.items() if "pytest_sandbox.plugin" in imported]
    assert importers == []


def test_no_project_import_inside_a_function() -> None:
    hidden = [
        f"{name} imports {imported}"
        for name, path in MODULES.items()
        for imported, top in _imports(path)
        if imported.startswith("pytest_sandbox") and not top
    ]
    assert hidden == []


def test_no_import_cycles() -> None:
    def package_of(module: str) -> str | None:
        return module if MODULES[module].name == "__init__.py" else None

    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "active"
        for imported in GRAPH.get(module, []):
            if imported not in MODULES or package_of(imported):
                continue  # a package's __init__ (docstring only) is not part of a cycle
            if state.get(imported) == "active":
                cycles.append([*path[path.index(imported) :], imported] if imported in path else [module, imported])
            elif imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_layering_check_sees_imports() -> None:
    """The checks above rest on the parser: it must find a known edge of each kind."""
    assert "pytest_sandbox.linux.syscalls" in GRAPH["pytest_sandbox.linux.rootfs"]
    assert "pytest_sandbox.layers.format" in GRAPH["pytest_sandbox.linux.overlay"]
    assert "pytest_sandbox.session" in GRAPH["pytest_sandbox.plugin"]


def test_every_package_is_in_the_distribution() -> None:
    """pyproject lists packages by name: one left out installs from a wheel without it (an editable install hides
    that), and ``import pytest_sandbox`` fails there."""
    text = (PACKAGE.parent / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    listed = set(re.findall(r'"(pytest_sandbox[\w.]*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    packages = {_module_name(path.parent / "__init__.py") for path in PACKAGE.rglob("__init__.py")}
    assert packages - listed == set()
