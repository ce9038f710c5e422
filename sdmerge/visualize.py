"""Pictures of merge groups: paint an image by the groups of a plan on its token grid.

    labels = sdmerge.visualize.token_labels(plan, protected=1)      # [B, N]; -1: dropped token
    picture = sdmerge.visualize.paint_groups(image, labels[0], grid=(14, 14))

Every group's area is filled with the mean colour of the image over that area, and the pixels
on either side of a border between two groups (4-neighbourhood) get ``border_color``. This
module needs only torch and numpy (no plotting or image library); show the result with any
image viewer (e.g. ``matplotlib.pyplot.imshow``).

Where the labels come from: a ViT's provenance plan (``sdmerge.vit.reduction_state(model).provenance``,
or :func:`sdmerge.plan_recording.vit_provenance_after` for the plan after a chosen block), or a
Stable Diffusion block's plan at a chosen step (:func:`sdmerge.plan_recording.record_plans`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .core.plan import MergePlan

DROPPED = -1
"""The label :func:`token_labels` gives a dropped (pruned) token; :func:`paint_groups` paints it ``dropped_color``."""


def token_labels(plan: MergePlan, protected: int = 0) -> Tensor:
    """The group of every token of ``plan`` on the image's token grid: ``[B, N - protected]`` int64.

    Args:
        plan: a merge plan over ``N`` tokens (``labels [B, N]``), e.g. a ViT's provenance plan.
        protected: leading tokens that are not image patches (ViT class / distillation tokens:
            1 for ViT, 2 for DeiT); they are left out.

    Dropped tokens (pruning methods: label ``M``) get :data:`DROPPED`.
    """
    if isinstance(protected, bool) or not isinstance(protected, int) or not 0 <= protected < plan.num_tokens:
        raise ValueError(f"protected={protected!r} must be an int in [0, {plan.num_tokens}) (the plan has {plan.num_tokens} tokens)")
    labels = plan.labels[:, protected:]
    return labels.masked_fill(labels == plan.num_groups, DROPPED) if plan.drops else labels


def _image_tensor(image) -> tuple[Tensor, str]:
    """``image`` as a float32 ``[3, H, W]`` tensor with values in [0, 1] (uint8 arrays are
    divided by 255), and the kind of input (``"tensor"`` or ``"array"``)."""
    if isinstance(image, Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be [3, H, W], got {tuple(image.shape)}")
        return image.detach().float(), "tensor"
    array = np.asarray(image)  # numpy arrays, and PIL images through their array interface
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"an image array must be [H, W, 3] (or RGBA), got shape {array.shape}")
    scale = 255.0 if array.dtype == np.uint8 else 1.0
    return torch.tensor(array[..., :3], dtype=torch.float32).permute(2, 0, 1) / scale, "array"


def paint_groups(
    image,
    labels,
    grid: tuple[int, int],
    *,
    border_color: tuple[float, float, float] | None = (1.0, 1.0, 1.0),
    dropped_color: tuple[float, float, float] = (0.0, 0.0, 0.0),
):
    """Paint ``image`` by the token groups ``labels`` on a ``grid = (H, W)`` token grid.

    Args:
        image: ``[3, H*p, W*q]`` float tensor (returned as such), or an ``[H*p, W*q, 3]`` numpy
            array / PIL image (uint8 in [0, 255] or float in [0, 1]; returned as an
            ``[H*p, W*q, 3]`` float32 array in [0, 1]). Every token covers a ``p x q`` pixel patch.
        labels: ``[N]`` (or ``[1, N]``), ``N = H * W``, tokens in row-major order, any integers
            naming the groups; :data:`DROPPED` (-1) marks a token that belongs to no group.
            For a batch ``[B, N]``, pass one sample's row.
        border_color: colour of the pixels next to a different group; ``None``: no borders.
        dropped_color: colour of dropped tokens' patches.

    Every pixel of a group gets the group's mean colour (over all its pixels); a pixel whose
    right, left, upper or lower neighbour belongs to another group gets ``border_color``.
    """
    pixels, kind = _image_tensor(image)
    labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[0] == 1:
        labels = labels[0]
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer [N] (one sample), got {labels.dtype} {tuple(labels.shape)}")
    height, width = grid
    if labels.numel() != height * width:
        raise ValueError(f"grid {height}x{width} has {height * width} tokens, but labels has {labels.numel()}")
    image_height, image_width = pixels.shape[1:]
    if image_height % height or image_width % width:
        raise ValueError(f"a {image_height}x{image_width} image does not tile into a {height}x{width} token grid")
    patch_height, patch_width = image_height // height, image_width // width
    labels = labels.to(torch.int64).cpu().view(height, width)
    pixel_labels = labels.repeat_interleave(patch_height, 0).repeat_interleave(patch_width, 1)  # [H p, W q]

    groups, inverse = torch.unique(pixel_labels.flatten(), return_inverse=True)
    flat = pixels.flatten(1).T  # [pixels, 3]
    sums = torch.zeros(len(groups), 3).index_add_(0, inverse, flat)
    counts = torch.bincount(inverse, minlength=len(groups)).float()
    means = sums / counts[:, None]
    means[groups == DROPPED] = torch.tensor(dropped_color, dtype=torch.float32)
    painted = means[inverse].T.reshape(3, image_height, image_width)

    if border_color is not None:
        border = torch.zeros(image_height, image_width, dtype=torch.bool)
        across = pixel_labels[:, 1:] != pixel_labels[:, :-1]  # between horizontal neighbours
        border[:, 1:] |= across
        border[:, :-1] |= across
        down = pixel_labels[1:] != pixel_labels[:-1]  # between vertical neighbours
        border[1:] |= down
        border[:-1] |= down
        painted[:, border] = torch.tensor(border_color, dtype=torch.float32)[:, None]
    return painted if kind == "tensor" else painted.permute(1, 2, 0).numpy()
