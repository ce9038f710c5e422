"""``sdmerge.apply`` / ``sdmerge.remove``: one entry point, dispatched by model type.

Every integration module exposes ``accepts(model) -> bool``, ``apply(model, method, r,
**options) -> model`` and ``remove(model) -> None``; the first integration that accepts the
model handles it. An integration may also expose ``why_unsupported(model) -> str | None``,
which explains why a model of its family that it does not accept cannot be patched. What
``r`` (the keep rate) and the options mean depends on the family; each family declares its
options once (:mod:`sdmerge.options`), and ``help(sdmerge.apply)`` lists them.

An integration is imported, and asked, only once the library of its models is imported
(:func:`_integration_for`), so ``import sdmerge`` (the core, ``cluster``) loads neither diffusers
nor transformers, and patching a transformers ViT does not load diffusers.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

from .diffusion.config import APPLY_ARGUMENTS, MergeConfig
from .methods import METHODS
from .options import describe
from .vit.options import ReductionOptions

INTEGRATIONS = (("diffusion", "diffusers"), ("vit.transformers", "transformers"), ("vit.timm", "timm"))
"""The integration modules of ``sdmerge``, in the order they are asked, each with the library
whose models it patches."""


def _supported_names(integration) -> str:
    """What an integration accepts, for error messages: its ``SUPPORTED`` text, else its name."""
    return getattr(integration, "SUPPORTED", integration.__name__)


def _integration_for(model):
    """The integration that accepts ``model``; ``TypeError`` naming what is supported if none does.

    Only integrations whose model library is already imported are asked (and imported): a model
    of a library cannot exist before that library is imported, so this skips no model and keeps
    e.g. a ViT's ``apply`` from importing diffusers (hundreds of modules).
    """
    modules, not_imported = [], []
    for name, library in INTEGRATIONS:
        if library in sys.modules:
            modules.append(importlib.import_module(f"{__package__}.{name}"))
        else:
            not_imported.append(f"{library} models ({library} is not imported)")
    for integration in modules:
        if integration.accepts(model):
            return integration
    name = f"{type(model).__module__}.{type(model).__name__}"
    for integration in modules:
        reason = getattr(integration, "why_unsupported", lambda model: None)(model)
        if reason is not None:
            raise TypeError(f"sdmerge does not support {name}: {reason}")
    supported = "; ".join([_supported_names(integration) for integration in modules] + not_imported)
    raise TypeError(f"sdmerge does not support {name}; supported: {supported}")


def apply(model, method: str = "tome", r: float | None = None, **options):
    """Patch ``model`` in place to merge tokens with ``method`` at keep rate ``r``; returns it.

    ``r`` is the fraction of tokens kept, a real number ``0 < r <= 1``; ``None`` takes the
    family's default (0.5). ``sdmerge.remove(model)`` undoes it exactly. Methods and options
    (``name: kind = default -- meaning``) depend on the model family:

{families}
    """
    integration = _integration_for(model)
    if r is None:
        return integration.apply(model, method, **options)
    return integration.apply(model, method, r, **options)


FAMILIES = (
    ("sd", "Diffusion models (diffusers; a model or its pipeline): UNet2DConditionModel (SD-1.x, SD-2.x, SDXL), "
     "SD3Transformer2DModel (SD3, SD3.5), PixArtTransformer2DModel", MergeConfig, APPLY_ARGUMENTS),
    ("vit", "ViT/DeiT classifiers (transformers, timm)", ReductionOptions, ()),
)
"""``(tag in Method.models, family, the dataclass declaring its options, fields that are not options)``."""


def _families_doc() -> str:
    """Each family's method names (``sdmerge.methods.METHODS``) and declared options, for :func:`apply`'s docstring."""
    return "\n\n".join(
        textwrap.fill(f"{family}:", 100, initial_indent=" " * 4, subsequent_indent=" " * 4) + "\n"
        + textwrap.fill(", ".join(name for name, m in METHODS.items() if tag in m.models), 100,
                        initial_indent=" " * 8 + "methods: ", subsequent_indent=" " * 12) + "\n"
        + f"        options:\n{describe(declaration, indent=' ' * 12, skip=skip)}"
        for tag, family, declaration, skip in FAMILIES
    )


if apply.__doc__ is not None:  # None under python -OO
    apply.__doc__ = apply.__doc__.format(families=_families_doc())


def remove(model) -> None:
    """Undo :func:`apply`; the model behaves exactly as before. No-op on an unpatched model."""
    _integration_for(model).remove(model)


def new_generation(model) -> None:
    """Mark that the next call of the patched diffusion ``model`` (a pipeline or its denoiser) in
    this thread starts a new generation: see :func:`sdmerge.diffusion.new_generation`. Pipeline
    calls mark their own generations; this is for a bare UNet or transformer in a loop of yours."""
    from .diffusion import new_generation as mark

    mark(model)
