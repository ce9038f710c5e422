"""sdmerge: token merging for Stable Diffusion and ViT/DeiT, without retraining."""

from importlib import import_module as _import_module

from .api import apply, new_generation, remove
from .core import MergePlan, cluster
from .methods import METHODS as _METHODS

METHODS: tuple[str, ...] = tuple(_METHODS)
"""Every method name; ``sdmerge.methods.METHODS`` says which models each applies to."""

__version__ = "0.1.0"

__all__ = ["METHODS", "MergePlan", "apply", "cluster", "new_generation", "remove"]

LAZY_SUBMODULES = ("plan_recording", "visualize", "diffusion", "vit")
"""Submodules imported on first attribute access (``sdmerge.visualize.paint_groups`` works right
after ``import sdmerge``), so that ``import sdmerge`` loads neither diffusers nor transformers."""


def __getattr__(name: str):
    if name in LAZY_SUBMODULES:
        return _import_module(f"{__name__}.{name}")  # the import also binds it on this module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(LAZY_SUBMODULES))
