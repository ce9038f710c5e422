"""Grid grouping: every ``sy x sx`` window of the token grid is one group (ToDo's average pooling).

ToDo (Smith et al. 2024, "ToDo: Token Downsampling for Efficient Generation of High-Resolution
Images") downsamples the keys and values of a UNet self-attention by average-pooling the
``h x w`` token grid with a ``sy x sx`` window and stride. As a merge plan, each window is a
group and its merged token is the plain mean of the window: no similarity is computed, so the
plan costs almost nothing. Windows cut by the grid's right or bottom edge are groups of the
tokens they hold, so every token belongs to a group (``partial_windows="keep"``), or, as ToDo's
pooling does (``avg_pool2d`` without padding), their tokens are dropped (``"drop"``).
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


PARTIAL_WINDOWS = ("keep", "drop")
"""What :func:`window_groups` does with the windows cut by the grid's right and bottom edges."""


def window_groups(
    batch_size: int, height: int, width: int, sy: int, sx: int, *, sizes=None, device=None,
    partial_windows: str = "keep",
) -> MergePlan:
    """The plan whose groups are the ``sy x sx`` windows of an ``height x width`` grid.

    Tokens are in raster order (token ``y * width + x``); window ``(y // sy, x // sx)`` is group
    ``(y // sy) * columns + x // sx``, so groups are numbered by their first token. The windows
    cut by the right or bottom edge (when ``sy`` or ``sx`` does not divide the grid):

    - ``partial_windows="keep"``: groups of the tokens they hold; ``columns = ceil(width / sx)``,
      ``ceil(height / sy) * ceil(width / sx)`` groups;
    - ``"drop"``: their tokens are dropped (label ``M``); ``columns = floor(width / sx)``,
      ``floor(height / sy) * floor(width / sx)`` groups, the windows of ToDo's pooling
      (``avg_pool2d`` with kernel and stride ``(sy, sx)``: a 33x33 grid at 2x2 keeps 16x16
      tokens). Only for merges that need no unmerge (keys and values): dropped tokens get no row back.

    Returns a plan of ``[B, N = height * width]`` labels shared by the batch. With ``sizes`` given
    the merge is size-weighted, else the plain window mean (``avg_pool2d``'s when every group is a
    whole window; the plan then has ``equal_groups``).
    """
    if min(height, width, sy, sx) < 1:
        raise ValueError(f"grid {height}x{width} and window {sy}x{sx} must be positive")
    if partial_windows not in PARTIAL_WINDOWS:
        raise ValueError(f"partial_windows={partial_windows!r}; allowed: {', '.join(PARTIAL_WINDOWS)}")
    drop = partial_windows == "drop" and (height % sy != 0 or width % sx != 0)
    if drop and (height < sy or width < sx):
        raise ValueError(f"a {height}x{width} grid holds no whole {sy}x{sx} window to keep (partial_windows='drop')")
    rows_kept, columns = (height // sy, width // sx) if drop else (-(-height // sy), -(-width // sx))
    rows = torch.arange(height, device=device).div(sy, rounding_mode="floor")
    cols = torch.arange(width, device=device).div(sx, rounding_mode="floor")
    labels = rows[:, None] * columns + cols[None, :]
    if drop:  # tokens of the cut windows: the dropped label M
        labels = labels.masked_fill((rows[:, None] >= rows_kept) | (cols[None, :] >= columns), rows_kept * columns)
    labels = labels.view(1, height * width).expand(batch_size, -1).contiguous()
    whole = drop or (height % sy == 0 and width % sx == 0)
    return MergePlan(labels, rows_kept * columns, sizes, drops=drop, equal_groups=whole)
