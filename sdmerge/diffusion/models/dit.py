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
from ..layout import Argument, BlockSite, Carrier, Layout


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


def transformer_layout(
    family: str,
    transformer: nn.Module,
    config: MergeConfig,
    blocks: list[tuple[str, nn.Module]],
    site: Callable[[str, nn.Module, int], BlockSite],
    model_kwargs: Argument,
    block_kwargs: Argument,
    timestep: Argument,
    grid: Callable[[tuple, dict], tuple[int, int] | None],
    *,
    positions: Callable[[tuple, dict], object] | None = None,
    timestep_scale: float = 1.0,
) -> Layout:
    """A diffusion transformer's layout: ``blocks`` (``(name, block)`` in order), the chosen ones
    merged (``site(name, block, index)`` describes one); the model carries each call to every block
    in ``model_kwargs``, which each block receives as ``block_kwargs``; ``grid`` and ``positions``
    read the call's token grid and positions; ``timestep`` is its timestep argument."""
    sites = [site(*blocks[index], index) for index in chosen_blocks(len(blocks), config, family)]
    receivers = [(name, block, block_kwargs) for name, block in blocks]
    carrier = Carrier("", transformer, model_kwargs, grid, receivers, positions=positions)
    return Layout(family, transformer, Argument("hidden_states", 0), timestep, sites, [carrier], timestep_scale)
