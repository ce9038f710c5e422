"""The grid grouping's windows cut by the grid's edge: kept as smaller groups, or dropped as ToDo's pooling
(``torch.nn.functional.avg_pool2d``, which leaves out the rows and columns no whole window covers)."""

import pytest
import torch

from sdmerge.core import window_groups


def pooled(x, height, width, sy, sx):
    """``avg_pool2d`` of raster-order tokens ``[B, h * w, C]`` with kernel = stride = ``(sy, sx)``: ``[B, M, C]``."""
    B, _, C = x.shape
    grid = x.view(B, height, width, C).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(grid, (sy, sx), stride=(sy, sx)).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("height, width, sy, sx", [(33, 33, 2, 2), (64, 64, 3, 3), (7, 10, 2, 3), (5, 9, 1, 2), (8, 6, 2, 2)])
def test_dropping_partial_windows_merges_as_avg_pool2d(height, width, sy, sx):
    x = torch.randn(2, height * width, 5, generator=torch.Generator().manual_seed(0))
    plan = window_groups(2, height, width, sy, sx, partial_windows="drop")
    assert plan.num_groups == (height // sy) * (width // sx)  # ToDo's pooled key count
    torch.testing.assert_close(plan.merge(x), pooled(x, height, width, sy, sx))
    assert plan.equal_groups  # every kept group is a whole window: proportional attention is a constant
    tiles = height % sy == 0 and width % sx == 0
    assert plan.drops != tiles  # on a tiled grid nothing is cut, and the plan is the "keep" plan
    if tiles:
        assert torch.equal(plan.labels, window_groups(2, height, width, sy, sx).labels)
    else:  # the partial windows' tokens are dropped (label M), every other token is in its window's group
        y, x_ = torch.arange(height)[:, None], torch.arange(width)[None, :]
        cut = ((y >= height // sy * sy) | (x_ >= width // sx * sx)).flatten()
        assert torch.equal(plan.labels[0] == plan.num_groups, cut)
        assert torch.equal(plan.counts, torch.full((2, plan.num_groups), float(sy * sx)))


def test_paper_grid_sizes_give_todos_key_counts():
    assert window_groups(1, 33, 33, 2, 2, partial_windows="drop").num_groups == 16 * 16
    assert window_groups(1, 33, 33, 2, 2).num_groups == 17 * 17  # kept partial windows: 17x17 groups
    assert window_groups(1, 64, 64, 3, 3, partial_windows="drop").num_groups == 441  # SD-1.5 at 512x512, f=3
    assert window_groups(1, 64, 64, 3, 3).num_groups == 484


def test_keeping_partial_windows_differs_from_avg_pool2d_only_at_the_edges():
    height, width, sy, sx = 5, 7, 2, 2
    x = torch.randn(1, height * width, 3, generator=torch.Generator().manual_seed(1))
    kept = window_groups(1, height, width, sy, sx, partial_windows="keep")
    assert kept.num_groups == 3 * 4 and not kept.drops and not kept.equal_groups
    merged = kept.merge(x).view(1, 3, 4, 3)
    torch.testing.assert_close(merged[:, :2, :3].flatten(1, 2), pooled(x, height, width, sy, sx))  # whole windows
    torch.testing.assert_close(merged[0, 2, 3], x[0, -1])  # the corner window holds the last token alone


def test_partial_windows_is_validated():
    with pytest.raises(ValueError, match=r"partial_windows='crop'; allowed: keep, drop"):
        window_groups(1, 4, 4, 2, 2, partial_windows="crop")
    with pytest.raises(ValueError, match="a 3x5 grid holds no whole 4x2 window"):
        window_groups(1, 3, 5, 4, 2, partial_windows="drop")
