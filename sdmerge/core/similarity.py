"""Cosine similarity between two token subsets: the matching step shared by ToMe and MSTM."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens: ``x: [B, N, C]``, ``index: [n]`` (shared by the batch) or ``[B, n]`` -> ``[B, n, C]``."""
    B, _, C = x.shape
    if index.dim() == 1:
        index = index.expand(B, -1)
    return x.gather(1, index.unsqueeze(-1).expand(B, index.shape[1], C))


def most_similar(metric: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """For every source token, its most similar destination token by cosine similarity.

    Args:
        metric: ``[B, N, D]`` token features.
        src: ``[n_src]`` or ``[B, n_src]`` token indices.
        dst: ``[n_dst]`` or ``[B, n_dst]`` token indices.

    Returns:
        ``(score, choice)``, both ``[B, n_src]``: the best cosine similarity and the position
        (in ``dst``, not a token index) of the destination that achieves it.
    """
    unit = F.normalize(metric, dim=-1)
    scores = gather_tokens(unit, src) @ gather_tokens(unit, dst).transpose(-1, -2)  # [B, n_src, n_dst]
    return scores.max(dim=-1)


def token_index(index: Tensor, batch_size: int) -> Tensor:
    """``[n]`` or ``[B, n]`` token indices as ``[B, n]``."""
    return index.expand(batch_size, -1) if index.dim() == 1 else index

