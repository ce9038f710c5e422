"""ToMe's bipartite soft matching (Bolya et al. 2022; for Stable Diffusion, Bolya & Hoffman 2023).

Tokens are split into sources (set A) and destinations (set B). Every source picks its most
similar destination (cosine similarity of the metric); the ``remove`` sources with the best
scores join their destination's group, every other token stays alone. One destination may
absorb several sources.

Two splits:
- :func:`alternating_split` (ViT): A = even positions, B = odd positions, protected prefix
  tokens (class, distillation) in neither set, so they are never merged.
- :func:`random_2d_split` (Stable Diffusion): one destination per ``sy x sx`` window of the
  ``h x w`` token grid, chosen at random (or the top-left one), tokens in leftover edge
  rows/columns are sources; the whole batch shares the pattern. Defined exactly as
  ``tomesd.merge.bipartite_soft_matching_random2d``, including how a generator is consumed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import MergePlan, plan_from_representatives
from .similarity import most_similar, token_index


def alternating_split(num_tokens: int, protected: int = 0, device=None) -> tuple[Tensor, Tensor]:
    """ViT split: sources at even positions, destinations at odd positions, ``>= protected``.

    Returns ``(src, dst)`` token indices, ``[n_src]`` and ``[n_dst]``.
    """
    positions = torch.arange(protected, num_tokens, device=device)
    return positions[positions % 2 == 0], positions[positions % 2 == 1]


def random_2d_split(
    h: int,
    w: int,
    sx: int = 2,
    sy: int = 2,
    generator: torch.Generator | None = None,
    device=None,
    *,
    cell: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Stable Diffusion split of an ``h x w`` token grid (raster order), as tomesd defines it.

    One destination per ``sy x sx`` window: a random cell drawn with ``generator`` (one
    ``torch.randint(sy * sx, (h // sy, w // sx, 1))`` call, as tomesd), or the top-left cell
    when ``generator`` is None; or given: ``cell``, ``[h // sy, w // sx, 1]`` int64 in
    ``[0, sy * sx)``, the destination of every window in raster order within it (e.g. drawn
    with tensor ops, which compile). Cells outside the ``(h // sy) * sy`` by ``(w // sx) * sx``
    region are sources.

    Returns ``(src, dst)`` token indices in raster order, ``[h*w - n_dst]`` and ``[n_dst]``.
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"strides must be >= 1, got sx={sx}, sy={sy}")
    hsy, wsx = h // sy, w // sx
    if hsy == 0 or wsx == 0:
        raise ValueError(f"a {h}x{w} token grid has no full {sy}x{sx} window; use smaller strides")
    if cell is not None:
        if cell.shape != (hsy, wsx, 1):
            raise ValueError(f"cell must be [h // sy, w // sx, 1] = [{hsy}, {wsx}, 1], got {tuple(cell.shape)}")
        cell = cell.to(device=device, dtype=torch.int64)
    elif generator is None:
        cell = torch.zeros(hsy, wsx, 1, dtype=torch.int64, device=device)
    else:
        cell = torch.randint(sy * sx, size=(hsy, wsx, 1), device=generator.device, generator=generator).to(device)
    is_dst = torch.zeros(hsy, wsx, sy * sx, dtype=torch.bool, device=device)
    is_dst.scatter_(2, cell, True)
    grid = torch.zeros(h, w, dtype=torch.bool, device=device)
    grid[: hsy * sy, : wsx * sx] = is_dst.view(hsy, wsx, sy, sx).transpose(1, 2).reshape(hsy * sy, wsx * sx)
    # Destinations first, each group in raster order; the count is known, so no device sync.
    order = torch.argsort((~grid.flatten()).to(torch.uint8), stable=True)
    return order[hsy * wsx :], order[: hsy * wsx]


GROUP_ORDERS = ("position", "split")
"""How :func:`bipartite_soft_matching` numbers its groups (see there)."""


def bipartite_soft_matching(
    metric: Tensor, remove: int, src: Tensor, dst: Tensor, sizes: Tensor | None = None, *, order: str = "position"
) -> MergePlan:
    """Merge the ``remove`` sources most similar to a destination into it.

    Args:
        metric: ``[B, N, D]`` similarity features (cosine similarity is used).
        remove: tokens to remove, ``0 <= remove <= n_src``.
        src, dst: the split, ``[n]`` shared by the batch or ``[B, n]`` token indices.
        sizes: ``[B, N]`` token sizes carried into the plan.
        order: how the groups are numbered, i.e. the token order after merging:
            ``"position"``: by the position of the group's first token (merged tokens keep
            their relative order); ``"split"``: the order of ToMe's ViT implementation
            (``cat([unmerged sources, destinations])`` after the protected prefix): the tokens
            in neither set first, then the unmerged sources, then every destination (with
            what merged into it), each in ascending position.

    Returns a plan with ``N - remove`` groups.
    """
    B, N, _ = metric.shape
    n_src = src.shape[-1]
    if not 0 <= remove <= n_src:
        raise ValueError(
            f"bipartite matching can remove at most {n_src} of {N} tokens (the source set), asked to remove {remove}"
        )
    if order not in GROUP_ORDERS:
        raise ValueError(f"unknown group order {order!r}; allowed: {', '.join(GROUP_ORDERS)}")
    representative = torch.arange(N, device=metric.device).expand(B, N).contiguous()
    if remove > 0:
        with torch.no_grad():
            score, choice = most_similar(metric, src, dst)
            merged = score.argsort(dim=-1, descending=True)[:, :remove]  # positions in src
            src_tokens = token_index(src, B).gather(1, merged)
            dst_tokens = token_index(dst, B).gather(1, choice.gather(1, merged))
            representative.scatter_(1, src_tokens, dst_tokens)
    token_order = split_order(N, src, dst) if order == "split" else None
    return plan_from_representatives(representative, N - remove, sizes, order=token_order)


def split_order(num_tokens: int, src: Tensor, dst: Tensor) -> Tensor:
    """Token positions ordered as: neither set, sources, destinations; ascending within each.

    ``src``/``dst``: ``[n]`` or ``[B, n]`` indices. Returns ``[N]`` or ``[B, N]`` int64 (one
    sort of ``N`` keys per sample, on the device; no synchronisation).
    """
    positions = torch.arange(num_tokens, device=src.device)
    batch = src.shape[:-1]
    group = torch.zeros(*batch, num_tokens, dtype=torch.int64, device=src.device)
    group.scatter_(-1, src, 1).scatter_(-1, dst, 2)
    return (group * num_tokens + positions).argsort(dim=-1)
