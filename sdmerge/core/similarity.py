"""Cosine similarity between two token subsets: the matching step shared by ToMe and MSTM."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .plan import batch_rows

# Similarity scores are computed this many at a time (16 MB in float32): at 1024x1024, Stable
# Diffusion's top level compares 12288 sources with 4096 destinations per sample, whose full
# score matrix (200 MB) would cost more in memory traffic than its maximum needs. Chunking rows
# of a matrix product leaves every score unchanged.
SCORE_CHUNK_ELEMENTS = 1 << 22


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """Pick tokens: ``x: [B, N, C]``, ``index: [n]`` (shared by the batch) or ``[B, n]`` -> ``[B, n, C]``."""
    B, N, C = x.shape
    if index.dim() == 1:
        return x.index_select(1, index)
    return x.reshape(B * N, C).index_select(0, batch_rows(index, N)).view(B, index.shape[1], C)


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
    sources, destinations = gather_tokens(unit, src), gather_tokens(unit, dst).transpose(-1, -2)
    B, n_dst = sources.shape[0], destinations.shape[2]
    rows = max(1, SCORE_CHUNK_ELEMENTS // max(1, B * n_dst))
    best = [(chunk @ destinations).max(dim=-1) for chunk in sources.split(rows, dim=1)]  # [B, rows, n_dst] each
    if len(best) == 1:
        return best[0]
    return torch.cat([score for score, _ in best], dim=1), torch.cat([choice for _, choice in best], dim=1)


def token_index(index: Tensor, batch_size: int) -> Tensor:
    """``[n]`` or ``[B, n]`` token indices as ``[B, n]``."""
    return index.expand(batch_size, -1) if index.dim() == 1 else index

