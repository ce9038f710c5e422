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
    from ..api import _integration_for

    integration = _integration_for(model)
    if not hasattr(integration, "reduction_state"):
        raise TypeError(f"{type(model).__name__} is not a ViT/DeiT classifier; reduction_state needs one")
    return integration.reduction_state(model)


__all__ = ["reduction_state"]
