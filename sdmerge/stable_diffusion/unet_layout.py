"""Where things are in a diffusers UNet: the UNet of a model, its transformer blocks by resolution level."""

from __future__ import annotations

from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from torch._dynamo.eval_frame import OptimizedModule

SUPPORTED = "DiffusionPipeline (with a UNet2DConditionModel), UNet2DConditionModel (torch.compile'd or not)"
"""What :func:`apply` accepts: a UNet2DConditionModel, or a pipeline holding one as ``.unet``."""


def _uncompiled(model):
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) wraps; any other object as it is."""
    while isinstance(model, OptimizedModule):
        model = model._orig_mod
    return model


def _unet_of(model) -> UNet2DConditionModel | None:
    """``model`` or ``model.unet`` as a UNet2DConditionModel (compiled or not), else ``None``."""
    for candidate in (model, getattr(model, "unet", None)):
        candidate = _uncompiled(candidate)
        if isinstance(candidate, UNet2DConditionModel):
            return candidate
    return None


def accepts(model) -> bool:
    """Whether ``model`` is a UNet2DConditionModel or holds one as ``.unet`` (SD pipelines);
    either may be wrapped by ``torch.compile``."""
    return _unet_of(model) is not None


def why_unsupported(model) -> str | None:
    """Why a model of the Stable Diffusion family that :func:`accepts` refuses cannot be patched
    (a ControlNet), for the dispatcher's error; ``None`` for other models."""
    if "ControlNet" in type(_uncompiled(model)).__name__:
        return (
            f"{type(model).__name__} is a ControlNet, which sdmerge leaves unmerged: it merges tokens in the "
            "pipeline's UNet only. Pass the pipeline or its UNet instead: sdmerge.apply(pipe) or "
            "sdmerge.apply(pipe.unet)"
        )
    return None


def find_unet(model) -> UNet2DConditionModel:
    """The UNet of ``model`` (itself, or ``model.unet``; the module a ``torch.compile`` wrapper
    wraps); ``TypeError`` if it has none."""
    unet = _unet_of(model)
    if unet is not None:
        return unet
    reason = why_unsupported(model)
    if reason is not None:
        raise TypeError(reason)
    held = getattr(model, "unet", None)
    found = "" if held is None else f" (its .unet is a {type(held).__name__})"
    raise TypeError(
        f"{type(model).__name__} is not supported by sdmerge's Stable Diffusion integration{found}: "
        "expected a diffusers UNet2DConditionModel or a pipeline holding one as .unet"
    )


def transformer_blocks_by_level(unet: UNet2DConditionModel) -> list[tuple[str, BasicTransformerBlock, int]]:
    """Every ``BasicTransformerBlock`` of the UNet with its name and resolution level.

    The level of a down block is the number of downsamplers before it; the mid block is at
    the deepest level; each upsampler of an up block raises the resolution of the next one.
    """
    parts, level = [], 0
    for i, down in enumerate(unet.down_blocks):
        parts.append((f"down_blocks.{i}", down, level))
        level += getattr(down, "downsamplers", None) is not None
    if unet.mid_block is not None:
        parts.append(("mid_block", unet.mid_block, level))
    for i, up in enumerate(unet.up_blocks):
        parts.append((f"up_blocks.{i}", up, level))
        level -= getattr(up, "upsamplers", None) is not None
    return [
        (f"{prefix}.{name}", module, part_level)
        for prefix, part, part_level in parts
        for name, module in part.named_modules()
        if isinstance(module, BasicTransformerBlock)
    ]


def blocks_to_merge(unet: UNet2DConditionModel, max_downsample: int) -> list[tuple[str, BasicTransformerBlock, int]]:
    """The ``(name, block, level)`` whose downsampling factor relative to the first level with
    attention, ``2 ** (level - first)``, is at most ``max_downsample``."""
    blocks = transformer_blocks_by_level(unet)
    if not blocks:
        raise ValueError(f"{type(unet).__name__} has no transformer blocks (BasicTransformerBlock): nothing to merge")
    first = min(level for _, _, level in blocks)
    return [(name, block, level) for name, block, level in blocks if 2 ** (level - first) <= max_downsample]


def enclosing_transformer(unet: UNet2DConditionModel, block_name: str) -> tuple[str, Transformer2DModel]:
    """The innermost ``Transformer2DModel`` holding the transformer block ``block_name``, with its
    name: the module whose ``[B, C, H, W]`` input gives the block's token grid."""
    enclosing = [
        (name, module)
        for name, module in unet.named_modules()
        if isinstance(module, Transformer2DModel) and block_name.startswith(name + ".")
    ]
    if not enclosing:
        raise ValueError(
            f"{block_name} is not inside a Transformer2DModel: its token grid, which the split needs, is unknown"
        )
    return max(enclosing, key=lambda item: len(item[0]))
