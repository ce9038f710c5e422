"""What a user installs and imports: the names ``import sdmerge`` gives, and the dependencies
pyproject.toml declares for the library and for the scripts."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

import sdmerge

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_submodule_is_imported_with_the_package_or_lazily():
    """Lazily: on first use, so that ``import sdmerge`` loads no model library (.ci/check_wheel.py,
    run by tests/test_vit.py, checks that in a fresh process)."""
    modules = {path.stem for path in (ROOT / "sdmerge").glob("*.py")} | {
        path.parent.name for path in (ROOT / "sdmerge").glob("*/__init__.py")
    }
    public = {name for name in modules if not name.startswith("_")}
    eager = {"api", "core", "methods", "options"}  # imported by sdmerge/__init__.py (help is built from options)
    assert public == eager | set(sdmerge.LAZY_SUBMODULES)
    assert set(sdmerge.LAZY_SUBMODULES) <= set(dir(sdmerge))
    for name in sdmerge.LAZY_SUBMODULES:  # what ``sdmerge.<name>`` gives before anything imported it
        assert sdmerge.__getattr__(name) is sys.modules[f"sdmerge.{name}"]
    with pytest.raises(AttributeError, match="module 'sdmerge' has no attribute 'diffusionn'"):
        sdmerge.diffusionn  # noqa: B018


def third_party_imports(folder: Path) -> set[str]:
    """Top-level names of the modules imported anywhere under ``folder`` that are neither the
    standard library nor this repository's own."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"sdmerge", "eval", "__future__"}


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def test_core_dependencies_are_exactly_the_libraries_sdmerge_imports():
    """A user who only wants ``sdmerge.apply`` installs nothing that the library does not use."""
    declared = {requirement_name(r) for r in PYPROJECT["project"]["dependencies"]}
    assert third_party_imports(ROOT / "sdmerge") == declared


def test_the_wheel_is_typed_and_licensed():
    assert (ROOT / "sdmerge" / "py.typed").is_file()
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["sdmerge"] == ["py.typed"]
    assert PYPROJECT["project"]["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
