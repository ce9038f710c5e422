"""``sdmerge.apply`` / ``sdmerge.remove``: one entry point, dispatched by model type.

Every integration module exposes ``accepts(model) -> bool``, ``apply(model, method, r,
**options) -> model`` and ``remove(model) -> None``; the first integration that accepts the
model handles it (for error messages, an integration may describe what it accepts in a
``SUPPORTED`` string). What ``r`` (the keep rate) and the options mean depends on the family:
``docs/vit.md`` for ViT/DeiT classifiers.
"""

from __future__ import annotations

from . import timm_vit, vit
from .schedule import DEFAULT_KEEP_RATE

INTEGRATIONS = (vit, timm_vit)
"""The integrations, in the order they are asked."""


def _supported_names(integration) -> str:
    """What an integration accepts, for error messages: its ``SUPPORTED`` text, else its name."""
    return getattr(integration, "SUPPORTED", integration.__name__)


def _integration_for(model):
    for integration in INTEGRATIONS:
        if integration.accepts(model):
            return integration
    supported = ", ".join(_supported_names(integration) for integration in INTEGRATIONS)
    raise TypeError(f"sdmerge does not support {type(model).__module__}.{type(model).__name__}; supported: {supported}")


def apply(model, method: str = "tome", r: float = DEFAULT_KEEP_RATE, **options):
    """Patch ``model`` in place to merge tokens with ``method`` at keep rate ``r``; returns it.

    ``r`` is the fraction of tokens kept, ``0 < r <= 1``. Options depend on the model family
    (ViT/DeiT: ``stages``, ``tokens_per_block``, ``schedule``, ``prop_attn``; see ``docs/vit.md``).
    """
    return _integration_for(model).apply(model, method, r, **options)


def remove(model) -> None:
    """Undo :func:`apply`; the model behaves exactly as before. No-op on an unpatched model."""
    _integration_for(model).remove(model)
