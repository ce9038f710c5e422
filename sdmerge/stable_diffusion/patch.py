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
    merge_attn: bool = True,
    merge_crossattn: bool = False,
    merge_mlp: bool = False,
    kv_only: bool = False,
    timestep_range: tuple[float, float] | None = None,
    **unknown,
):
    """Merge tokens in the transformer blocks of ``model``'s UNet (by default in their
    self-attention); returns ``model``.

    Args:
        model: a diffusers pipeline with a ``UNet2DConditionModel`` (SD-1.x, SD-2.x, SDXL and
            their img2img / inpaint / ControlNet variants), or that UNet; either may be
            ``torch.compile``d (the compiled module's ``_orig_mod`` is patched).
        method: ``tome``, ``atc_single``, ``atc_complete``, ``atc_average``, ``cis``, ``crucial`` or
            ``grid``.
        r: keep rate; a merged self-attention of ``N`` tokens sees ``N - floor(N (1 - r))``
            (``grid``: ``r = 1/n``, one token per window of ``n``).
        max_downsample, sx, sy, use_rand, seed, plan_every, share_plans, merge_attn,
            merge_crossattn, merge_mlp, kv_only, timestep_range: see :class:`MergeConfig`
            (plan reuse: ``sdmerge.stable_diffusion.plan_reuse``; the branches:
            ``sdmerge.stable_diffusion.processors``). A ``timestep_range`` whose ``low`` exceeds
            the largest timestep of a pipeline's scheduler (it would never merge) is refused.

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
    config = MergeConfig(
        method, r, max_downsample=max_downsample, sx=sx, sy=sy, use_rand=use_rand, seed=seed,
        plan_every=plan_every, share_plans=share_plans, merge_attn=merge_attn, merge_crossattn=merge_crossattn,
        merge_mlp=merge_mlp, kv_only=kv_only, timestep_range=timestep_range,
    )
    _check_range_against_scheduler(config.timestep_range, getattr(model, "scheduler", None))
    unet = find_unet(model)
    remove(unet)
    state = MergeState(unet, config)
    state.install()
    setattr(unet, _STATE_ATTRIBUTE, state)
    logger.info(
        "sdmerge: %s at r=%s merges %s of %s", config.method, config.keep_rate, "/".join(config.branches), state.names
    )
    return model


def _check_range_against_scheduler(timestep_range: tuple[float, float] | None, scheduler) -> None:
    """``ValueError`` if no timestep of ``scheduler`` (``0 .. num_train_timesteps - 1``) lies in the range."""
    last = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if timestep_range is not None and isinstance(last, int) and timestep_range[0] > last - 1:
        raise ValueError(
            f"timestep_range={timestep_range!r} never merges: the pipeline's scheduler has timesteps "
            f"0 .. {last - 1}; allowed: low <= {last - 1}"
        )


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
