"""The UNet layout: SD-1.x, SD-2.x and SDXL ``UNet2DConditionModel``.

Which blocks: level ``l`` of the UNet is the resolution after ``l`` downsamplings (SD-1.5:
``down_blocks.l``, ``up_blocks.(3-l)``, the mid block at level 3). A block is merged when
``2 ** (l - l0) <= max_downsample``, where ``l0`` is the highest-resolution level that has
attention: on SD-1.x/2.x ``l0 = 0`` (the same blocks as ``tomesd``); on SDXL, whose top level
has no attention, the default merges level 1 (``down_blocks.1``, ``up_blocks.1``).

Each merged ``BasicTransformerBlock``: the metric is its input ``x``; ``attn1`` (self-attention)
plans and merges, ``attn2`` (cross-attention) is ``merge_crossattn``'s branch and gives the
prompt mass of ``cis`` / ``crucial``, ``ff`` is ``merge_mlp``'s. The token grid of a block is the
``[B, C, H, W]`` input of its ``Transformer2DModel``, which also carries each UNet call to its
blocks in their ``cross_attention_kwargs`` (:mod:`sdmerge.diffusion.call`).
"""

from __future__ import annotations

from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock

from ..config import MergeConfig
from ..layout import Argument, BlockSite, Branch, Carrier, Layout, PromptMass, held, uncompiled
from ..prompt_importance import cross_attention_mass

SUPPORTED = "DiffusionPipeline (with a UNet2DConditionModel), UNet2DConditionModel (torch.compile'd or not)"
"""What this layout accepts: a UNet2DConditionModel, or a pipeline holding one as ``.unet``."""

HIDDEN_STATES = Argument("hidden_states", 0)
BLOCK_KWARGS = Argument("cross_attention_kwargs", 5)  # BasicTransformerBlock.forward's 6th argument
TRANSFORMER_KWARGS = Argument("cross_attention_kwargs", 5)  # Transformer2DModel.forward's 6th argument


def find(model) -> UNet2DConditionModel | None:
    """``model`` or ``model.unet`` as a UNet2DConditionModel (compiled or not), else ``None``."""
    return held(model, "unet", UNet2DConditionModel)


def why_unsupported(model) -> str | None:
    """Why a model of this family cannot be patched (a ControlNet, a ``.unet`` that is not a
    ``UNet2DConditionModel``), for the dispatcher's error; ``None`` for other models."""
    held = getattr(model, "unet", None)
    if held is not None and find(model) is None:
        return f"its .unet is a {type(held).__name__}, not a diffusers UNet2DConditionModel"
    if "ControlNet" in type(uncompiled(model)).__name__:
        return (
            f"{type(model).__name__} is a ControlNet, which sdmerge leaves unmerged: it merges tokens in the "
            "pipeline's UNet only. Pass the pipeline or its UNet instead: sdmerge.apply(pipe) or "
            "sdmerge.apply(pipe.unet)"
        )
    return None


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
        raise ValueError(f"{block_name} is not inside a Transformer2DModel, whose input gives its token grid")
    return max(enclosing, key=lambda item: len(item[0]))


def _input_grid(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(H, W)`` of a ``Transformer2DModel`` call's ``[B, C, H, W]`` hidden states."""
    hidden_states = HIDDEN_STATES.get(args, kwargs)
    return tuple(hidden_states.shape[-2:]) if hidden_states.dim() == 4 else None


def _site(name: str, block: BasicTransformerBlock, carrier: str, config: MergeConfig) -> BlockSite:
    if config.kv_only and block.only_cross_attention:
        raise ValueError(
            f"kv_only cannot merge {name}.attn1: it is a cross-attention (only_cross_attention=True), "
            "whose keys and values are the prompt"
        )
    if config.merge_mlp and getattr(block, "ff", None) is None:
        raise ValueError(f"merge_mlp: {name} has no feed-forward layer (ff)")
    attn2 = block.attn2
    return BlockSite(
        name,
        block,
        HIDDEN_STATES,
        carrier,
        attention=Branch(f"{name}.attn1", block.attn1, HIDDEN_STATES),
        crossattn=None if attn2 is None else Branch(f"{name}.attn2", attn2, HIDDEN_STATES),
        mlp=None if getattr(block, "ff", None) is None else Branch(f"{name}.ff", block.ff, HIDDEN_STATES),
        mass=None if attn2 is None else PromptMass(attn2, cross_attention_mass),
    )


def layout(unet: UNet2DConditionModel, config: MergeConfig) -> Layout:
    """The merged blocks of ``unet`` (``max_downsample``) and their carriers; ``ValueError`` for
    a diffusion-transformer option or a block the options cannot merge."""
    if config.blocks is not None:
        raise ValueError(
            f"blocks={config.blocks!r} selects the blocks of a diffusion transformer; a UNet's merged blocks are "
            "chosen by resolution: use max_downsample (1: the highest resolution with attention, 2: also the next)"
        )
    max_downsample = 1 if config.max_downsample is None else config.max_downsample
    chosen = blocks_to_merge(unet, max_downsample)
    carriers: dict[str, Carrier] = {}
    sites = []
    for name, block, _ in chosen:
        carrier_name, transformer = enclosing_transformer(unet, name)
        if carrier_name not in carriers:
            receivers = [
                (f"{carrier_name}.{inner}", module, BLOCK_KWARGS)
                for inner, module in transformer.named_modules()
                if isinstance(module, BasicTransformerBlock)
            ]
            carriers[carrier_name] = Carrier(carrier_name, transformer, TRANSFORMER_KWARGS, _input_grid, receivers)
        sites.append(_site(name, block, carrier_name, config))
    return Layout("UNet", unet, Argument("sample", 0), Argument("timestep", 1), sites, list(carriers.values()))
