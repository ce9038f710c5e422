"""``apply`` / ``remove``: patch a UNet (or a pipeline's) with a :class:`~.state.MergeState`."""

from __future__ import annotations

import logging

from .config import OPTIONS, MergeConfig
from .state import MergeState
from .unet_layout import find_unet

_STATE_ATTRIBUTE = "_sdmerge"


logger = logging.getLogger(__name__)


def apply(
    model,
    method: str = "tome",
    r: float = 0.5,
    *,
    max_downsample: int = 1,
    sx: int = 2,
    sy: int = 2,
    use_rand: bool = True,
    seed: int | None = None,
    plan_every: int = 1,
    share_plans: bool = False,
    **unknown,
):
    """Merge tokens in the self-attention of ``model``'s UNet; returns ``model``.

    Args:
        model: a diffusers pipeline with a ``UNet2DConditionModel`` (SD-1.x, SD-2.x, SDXL and
            their img2img / inpaint / ControlNet variants), or that UNet; either may be
            ``torch.compile``d (the compiled module's ``_orig_mod`` is patched).
        method: ``tome``, ``atc_single``, ``atc_complete``, ``atc_average``, ``cis`` or ``crucial``.
        r: keep rate; a merged self-attention of ``N`` tokens sees ``N - floor(N (1 - r))``.
        max_downsample, sx, sy, use_rand, seed, plan_every, share_plans: see :class:`MergeConfig`
            (the last two: plan reuse, ``sdmerge.plan_reuse``; off by default).

    Applying again replaces the previous patch. Processors set on merged layers later
    (attention slicing, fused QKV, ``set_default_attn_processor``) keep merging: sdmerge wraps
    them at the next UNet call. Raises ``ValueError`` / ``TypeError`` for an unknown method or
    option, a keep rate outside ``(0, 1]`` or below what the method can reach, and a model or
    attention layer that cannot be merged.
    """
    if unknown:
        raise TypeError(
            f"unknown option {', '.join(sorted(unknown))} for Stable Diffusion; accepted: {', '.join(OPTIONS)}"
        )
    config = MergeConfig(method, r, max_downsample, sx, sy, use_rand, seed, plan_every, share_plans)
    unet = find_unet(model)
    remove(unet)
    state = MergeState(unet, config)
    state.install()
    setattr(unet, _STATE_ATTRIBUTE, state)
    logger.info("sdmerge: %s at r=%s merges the self-attention of %s", config.method, config.keep_rate, state.names)
    return model


def remove(model) -> None:
    """Undo :func:`apply`: every processor sdmerge wrapped is back, unwrapped, and no hook is left.

    Without processor changes after ``apply`` that is the original processor objects. A
    processor set after ``apply`` (slicing, fused QKV, ``set_attn_processor``) stays, without
    sdmerge's wrapper. Does nothing on a UNet that is not patched.
    """
    unet = find_unet(model)
    state = getattr(unet, _STATE_ATTRIBUTE, None)
    if state is not None:
        state.uninstall()
        delattr(unet, _STATE_ATTRIBUTE)


def merged_blocks(model) -> tuple[str, ...]:
    """Names of the transformer blocks whose self-attention ``apply`` merges (``()`` if not patched)."""
    state = getattr(find_unet(model), _STATE_ATTRIBUTE, None)
    return () if state is None else state.names
