"""What a user installs and imports: the names ``import sdmerge`` gives, and the dependencies
pyproject.toml declares for the library and for the scripts."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sdmerge

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

LAZY_IMPORTS = """
import sys
import sdmerge
loaded = lambda: sorted(name for name in ("diffusers", "transformers") if name in sys.modules)
print(loaded())
print(sdmerge.visualize.paint_groups.__name__, sdmerge.plan_recording.vit_provenance_after.__name__,
      sdmerge.vit.reduction_state.__name__, loaded())
print(sdmerge.stable_diffusion.merged_blocks.__name__, loaded())
"""


def test_documented_submodules_work_right_after_import_sdmerge_and_load_libraries_only_when_used():
    done = subprocess.run([sys.executable, "-c", LAZY_IMPORTS], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == [
        "[]",  # import sdmerge: neither diffusers nor transformers
        "paint_groups vit_provenance_after reduction_state []",  # the ViT parts of plan_recording need no diffusers
        "merged_blocks ['diffusers', 'transformers']",
    ]


def test_every_submodule_is_imported_with_the_package_or_lazily():
    modules = {path.stem for path in (ROOT / "sdmerge").glob("*.py")} | {
        path.parent.name for path in (ROOT / "sdmerge").glob("*/__init__.py")
    }
    public = {name for name in modules if not name.startswith("_")}
    eager = {"api", "core", "methods"}  # imported by sdmerge/__init__.py
    assert public == eager | set(sdmerge.LAZY_SUBMODULES)
    assert set(sdmerge.LAZY_SUBMODULES) <= set(dir(sdmerge))
    with pytest.raises(AttributeError, match="module 'sdmerge' has no attribute 'stable_diffusionn'"):
        sdmerge.stable_diffusionn  # noqa: B018


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
