"""What the diffusion-transformer layouts share: which blocks merge, and the model as the carrier.

A diffusion transformer (SD3, PixArt, Flux) patchifies its latent once and runs every block on
the same ``(H / p) x (W / p)`` token grid, so the model itself carries each call to its blocks
(in the attention keyword arguments it passes every block) and its input gives the grid.

Which blocks: ``blocks=`` (0-based indices), or by default every block but the first and the last.
Token merging leaves the first block unmerged because the similarity of tokens is measured on
what the blocks before have built (the first block sees only the patch embedding and positions),
and the last one because its output goes straight to the final projection of every pixel. This
follows the token-reduction literature for transformers, which leaves the early blocks
unreduced ("Which tokens to use?" and ATC reduce after the first quarter of a ViT; ToMe-SD merges
only where a UNet has many tokens).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import MergeConfig
from ..layout import Argument, Carrier


def chosen_blocks(depth: int, config: MergeConfig, family: str) -> tuple[int, ...]:
    """The indices of the merged blocks of a ``depth``-block transformer; ``ValueError`` for a UNet
    option or an index outside ``0 .. depth - 1``."""
    if config.max_downsample is not None:
        raise ValueError(
            f"max_downsample={config.max_downsample} chooses UNet blocks by resolution; every block of a diffusion "
            f"transformer ({family}) sees the same token grid: choose them with blocks=(...) (0-based indices)"
        )
    if config.blocks is None:
        return tuple(range(1, depth - 1)) if depth > 2 else tuple(range(depth))
    outside = [index for index in config.blocks if index >= depth]
    if outside:
        raise ValueError(f"blocks={config.blocks!r}: {outside} are not blocks of this {family} model (0 .. {depth - 1})")
    return config.blocks


def patch_grid(tokens: Argument, patch_size: int) -> Callable[[tuple, dict], tuple[int, int] | None]:
    """The token grid of a model call whose ``tokens`` argument is the latent ``[B, C, H, W]``:
    ``(H // p, W // p)``, as the patch embedding makes it (a strided convolution floors)."""

    def grid(args: tuple, kwargs: dict) -> tuple[int, int] | None:
        latent = tokens.get(args, kwargs)
        return (latent.shape[-2] // patch_size, latent.shape[-1] // patch_size) if latent.dim() == 4 else None

    return grid


def model_carrier(
    model: nn.Module, attention_kwargs: Argument, grid, blocks: list[tuple[str, nn.Module]], block_kwargs: Argument
) -> Carrier:
    """The model as the carrier of its calls: its ``attention_kwargs`` reach every block in
    ``blocks`` (``(name, block)``), each of which takes the call out of its ``block_kwargs``."""
    return Carrier("", model, attention_kwargs, grid, [(name, block, block_kwargs) for name, block in blocks])
