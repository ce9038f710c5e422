"""The PixArt layout: PixArt-alpha / PixArt-sigma ``PixArtTransformer2DModel``.

Its blocks are ``BasicTransformerBlock``s with ``norm_type="ada_norm_single"`` (timestep
modulation per sample): a self-attention ``attn1``, a cross-attention ``attn2`` on the T5 prompt,
a feed-forward ``ff``, as in a UNet's transformer blocks, but every block at the model's one
token grid. The same branches merge as in the UNet (``attn1``; ``attn2`` with ``merge_crossattn``;
``ff`` with ``merge_mlp``; ``kv_only`` through ``attn1``'s ``encoder_hidden_states``). The
position embedding is added before the blocks (``PatchEmbed``), so a merged token carries its
group's mean position. ``cis`` / ``crucial``: ``attn2``'s mass on the prompt's words (every
unmasked T5 token but the end token ``</s>``), from the previous call of the generation.
"""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from ..config import MergeConfig
from ..layout import Argument, BlockSite, Branch, Layout, PromptMass, held
from ..prompt_importance import t5_cross_attention_mass
from .dit import patch_grid, transformer_layout

SUPPORTED = "PixArtAlphaPipeline / PixArtSigmaPipeline, PixArtTransformer2DModel (torch.compile'd or not)"

FAMILY = "PixArt"
HIDDEN_STATES = Argument("hidden_states", 0)
MODEL_KWARGS = Argument("cross_attention_kwargs", 4)  # PixArtTransformer2DModel.forward's 5th argument
BLOCK_KWARGS = Argument("cross_attention_kwargs", 5)  # BasicTransformerBlock.forward's 6th (checkpointing passes all)


def find(model) -> PixArtTransformer2DModel | None:
    """``model`` or ``model.transformer`` as a PixArtTransformer2DModel (compiled or not), else ``None``."""
    return held(model, "transformer", PixArtTransformer2DModel)


def why_unsupported(model) -> str | None:
    return None


def _site(name: str, block: BasicTransformerBlock) -> BlockSite:
    return BlockSite(
        name,
        block,
        HIDDEN_STATES,
        carrier="",
        attention=Branch(f"{name}.attn1", block.attn1, HIDDEN_STATES),
        crossattn=Branch(f"{name}.attn2", block.attn2, HIDDEN_STATES),
        mlp=Branch(f"{name}.ff", block.ff, HIDDEN_STATES),
        mass=PromptMass(block.attn2, t5_cross_attention_mass),
    )


def layout(transformer: PixArtTransformer2DModel, config: MergeConfig) -> Layout:
    """The merged blocks (``blocks``; default: all but the first and the last)."""
    blocks = [(f"transformer_blocks.{i}", block) for i, block in enumerate(transformer.transformer_blocks)]
    grid = patch_grid(HIDDEN_STATES, transformer.config.patch_size)
    return transformer_layout(
        FAMILY, transformer, config, blocks, lambda name, block, index: _site(name, block), MODEL_KWARGS,
        BLOCK_KWARGS, Argument("timestep", 2), grid,
    )
