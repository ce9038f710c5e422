"""The scripts' optional packages: imported when installed, otherwise a stand-in that says which
extra of pyproject.toml installs them.

A script imports what it needs beyond the library with :func:`optional_import` (so ``--help``
works without it) and calls :func:`require` right after parsing its arguments, so that a missing
package stops it before any work, with one line naming the extra, not a traceback.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

EXTRAS = {"accelerate": "sweep", "torchmetrics": "sweep", "tomesd": "bench", "scipy": "bench"}
"""The optional packages the scripts import -> the extra that installs them (the dev extra holds every one)."""


class Missing:
    """Stands for a module that could not be imported because the optional ``package`` is not
    installed; using it raises ``ModuleNotFoundError`` saying what to install."""

    def __init__(self, module: str, package: str):
        self.module = module
        self.package = package

    @property
    def message(self) -> str:
        extra = EXTRAS[self.package]
        use = "" if self.module == self.package else f" (for {self.module})"
        return (
            f"{Path(sys.argv[0]).name} needs {self.package}{use}, which is not installed; "
            f'it comes with sdmerge\'s {extra} extra: pip install -e ".[{extra}]"'
        )

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(self.message, name=self.package)


def optional_import(module: str) -> ModuleType | Missing:
    """``importlib.import_module(module)``, or a :class:`Missing` if a package of :data:`EXTRAS`
    that it needs is not installed (any other missing module is an error)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in EXTRAS:
            raise
        return Missing(module, package)


def require(*modules: ModuleType | Missing) -> None:
    """Exit with a message for every missing package among ``modules`` (none missing: return)."""
    missing: dict[str, str] = {}  # one message per package
    for module in modules:
        if isinstance(module, Missing):
            missing.setdefault(module.package, module.message)
    if missing:
        raise SystemExit("error: " + "\n".join(missing.values()))
