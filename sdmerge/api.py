"""``sdmerge.apply`` / ``sdmerge.remove``: one entry point, dispatched by model type.

Every integration module exposes ``accepts(model) -> bool``, ``apply(model, method, r,
**options) -> model`` and ``remove(model) -> None``; the first integration that accepts the
model handles it. What ``r`` (the keep rate) and the options mean depends on the family:
``docs/stable_diffusion.md`` for Stable Diffusion, ``docs/vit.md`` for ViT/DeiT classifiers.

The integrations are imported on first use, so ``import sdmerge`` (the core, ``cluster``) does
not load diffusers or transformers.
"""

from __future__ import annotations

import importlib

INTEGRATIONS = ("stable_diffusion", "vit.transformers", "vit.timm")
"""The integration modules of ``sdmerge``, in the order they are asked."""


def _supported_names(integration) -> str:
    """What an integration accepts, for error messages: its ``SUPPORTED`` text, else its name."""
    return getattr(integration, "SUPPORTED", integration.__name__)


def _integration_for(model):
    modules = [importlib.import_module(f"{__package__}.{name}") for name in INTEGRATIONS]
    for integration in modules:
        if integration.accepts(model):
            return integration
    supported = "; ".join(_supported_names(integration) for integration in modules)
    raise TypeError(f"sdmerge does not support {type(model).__module__}.{type(model).__name__}; supported: {supported}")


def apply(model, method: str = "tome", r: float | None = None, **options):
    """Patch ``model`` in place to merge tokens with ``method`` at keep rate ``r``; returns it.

    ``r`` is the fraction of tokens kept, ``0 < r <= 1``; ``None`` takes the family's default
    (0.5). Options depend on the model family: Stable Diffusion ``max_downsample``, ``sx``,
    ``sy``, ``use_rand``, ``seed``, ``plan_every``, ``share_plans`` (``docs/stable_diffusion.md``); ViT/DeiT ``stages``,
    ``tokens_per_block``, ``schedule``, ``prop_attn``, ``cis_score`` (``docs/vit.md``).
    """
    integration = _integration_for(model)
    if r is None:
        return integration.apply(model, method, **options)
    return integration.apply(model, method, r, **options)


def remove(model) -> None:
    """Undo :func:`apply`; the model behaves exactly as before. No-op on an unpatched model."""
    _integration_for(model).remove(model)
