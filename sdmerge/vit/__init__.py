"""Token reduction in ViT/DeiT classifiers: the shared reduction and two integrations.

- :mod:`.schedule`: how many tokens every block removes (stages or per-block counts);
- :mod:`.reduction`: what a reducing block does (config, per-call state, importance);
- :mod:`.patch`: installing and undoing a patch on a model;
- :mod:`.transformers`: Hugging Face transformers ViT/DeiT; :mod:`.timm`: timm ``VisionTransformer``.

Use ``sdmerge.apply`` / ``sdmerge.remove``; :func:`reduction_state` reads a patched model's
latest token sizes and provenance, whichever integration patched it.
"""

from __future__ import annotations


def reduction_state(model):
    """The :class:`~sdmerge.vit.reduction.ReductionState` of the patched ViT ``model``'s latest
    forward call (token ``sizes [B, N_L]`` and ``provenance``), or ``None`` before the first call.

    Raises ``TypeError`` for a model no ViT integration supports and ``ValueError`` for one
    that is not patched.
    """
    return _vit_integration(model).reduction_state(model)


def _vit_integration(model):
    """The ViT integration module that supports ``model``; ``TypeError`` for other models."""
    from ..api import _integration_for

    integration = _integration_for(model)
    if not hasattr(integration, "reduction_state"):
        raise TypeError(f"{type(model).__name__} is not a ViT/DeiT classifier")
    return integration


def blocks(model):
    """The transformer blocks of a ViT/DeiT ``model`` in order, whichever integration supports it
    (transformers in both layer layouts, timm); ``TypeError`` for other models."""
    return _vit_integration(model).blocks(model)


__all__ = ["blocks", "reduction_state"]
