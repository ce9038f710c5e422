"""Grid grouping: every ``sy x sx`` window of the token grid is one group (ToDo's average pooling).

ToDo (Smith et al. 2024, "ToDo: Token Downsampling for Efficient Generation of High-Resolution
Images") downsamples the keys and values of a UNet self-attention by average-pooling the
``h x w`` token grid with a ``sy x sx`` window and stride. As a merge plan, each window is a
group and its merged token is the plain mean of the window: no similarity is computed, so the
plan costs almost nothing. Windows cut by the grid's right or bottom edge are groups of the
tokens they hold, so every token belongs to a group.
"""

from __future__ import annotations

import math

import torch

from .plan import MergePlan, check_keep_rate


def window_for_keep_rate(keep_rate: float) -> tuple[int, int]:
    """The window ``(sy, sx)`` that keeps ``keep_rate`` of a grid's tokens: ``sy * sx = 1 / r``.

    ``1 / r`` must be a whole number ``n`` (within 1e-6); the window is the factor pair of ``n``
    closest to a square, the wider side horizontal: r=1/2 -> 1x2, 1/4 -> 2x2, 1/6 -> 2x3,
    1/8 -> 2x4, 1/9 -> 3x3. ``ValueError`` otherwise.
    """
    keep_rate = check_keep_rate(keep_rate)
    tokens = round(1.0 / keep_rate)
    if abs(tokens * keep_rate - 1.0) > 1e-6:
        raise ValueError(
            f"the grid grouping keeps one token per window, so r must be 1/n for a whole number n of tokens per "
            f"window (1, 1/2, 1/3, 1/4, ...); got r={keep_rate!r} (1/r = {1.0 / keep_rate:.6g})"
        )
    sy = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)
    return sy, tokens // sy


def window_groups(
    batch_size: int, height: int, width: int, sy: int, sx: int, *, sizes=None, device=None
) -> MergePlan:
    """The plan whose groups are the ``sy x sx`` windows of an ``height x width`` grid.

    Tokens are in raster order (token ``y * width + x``); window ``(y // sy, x // sx)`` is group
    ``(y // sy) * ceil(width / sx) + x // sx``, so groups are numbered by their first token.
    Returns a plan of ``[B, N = height * width]`` labels and ``ceil(height / sy) * ceil(width / sx)``
    groups, shared by the batch. With ``sizes`` given the merge is size-weighted, else the
    plain window mean (``avg_pool2d`` on windows the grid tiles; the plan then has
    ``equal_groups``).
    """
    if min(height, width, sy, sx) < 1:
        raise ValueError(f"grid {height}x{width} and window {sy}x{sx} must be positive")
    columns = -(-width // sx)
    rows = torch.arange(height, device=device).div(sy, rounding_mode="floor")
    cols = torch.arange(width, device=device).div(sx, rounding_mode="floor")
    labels = (rows[:, None] * columns + cols[None, :]).view(1, height * width).expand(batch_size, -1)
    tiles = height % sy == 0 and width % sx == 0
    return MergePlan(labels.contiguous(), -(-height // sy) * columns, sizes, equal_groups=tiles)
