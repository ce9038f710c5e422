"""sdmerge: token merging for Stable Diffusion and ViT/DeiT, without retraining."""

from .api import apply, new_generation, remove
from .core import MergePlan, cluster
from .methods import METHODS as _METHODS

METHODS: tuple[str, ...] = tuple(_METHODS)
"""Every method name; ``sdmerge.methods.METHODS`` says which models each applies to."""

__version__ = "0.1.0"

__all__ = ["METHODS", "MergePlan", "apply", "cluster", "new_generation", "remove"]
