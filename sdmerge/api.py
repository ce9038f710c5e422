"""``sdmerge.apply`` / ``sdmerge.remove``: one entry point, dispatched by model type.

Every integration module exposes ``accepts(model) -> bool``, ``apply(model, method, r,
**options) -> model`` and ``remove(model) -> None``; the first integration that accepts the
model handles it. What ``r`` (the keep rate) and the options mean depends on the family:
``docs/stable_diffusion.md`` for Stable Diffusion.
"""

from __future__ import annotations

from . import stable_diffusion

INTEGRATIONS = (stable_diffusion,)
"""The integrations, in the order they are asked."""


def _supported_names(integration) -> str:
    """What an integration accepts, for error messages: its ``SUPPORTED_CLASSES`` if it lists them."""
    classes = getattr(integration, "SUPPORTED_CLASSES", ())
    return ", ".join(cls.__name__ for cls in classes) or integration.__name__


def _integration_for(model):
    for integration in INTEGRATIONS:
        if integration.accepts(model):
            return integration
    supported = ", ".join(_supported_names(integration) for integration in INTEGRATIONS)
    raise TypeError(f"sdmerge does not support {type(model).__module__}.{type(model).__name__}; supported: {supported}")


def apply(model, method: str = "tome", r: float | None = None, **options):
    """Patch ``model`` in place to merge tokens with ``method`` at keep rate ``r``; returns it.

    ``r`` is the fraction of tokens kept, ``0 < r <= 1``; ``None`` takes the integration's
    default (Stable Diffusion: 0.5). Options depend on the model family (Stable Diffusion:
    ``max_downsample``, ``sx``, ``sy``, ``use_rand``, ``seed``; see ``docs/stable_diffusion.md``).
    """
    integration = _integration_for(model)
    if r is None:
        return integration.apply(model, method, **options)
    return integration.apply(model, method, r, **options)


def remove(model) -> None:
    """Undo :func:`apply`; the model behaves exactly as before. No-op on an unpatched model."""
    _integration_for(model).remove(model)
