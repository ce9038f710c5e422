"""Small shared test utilities."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from sdmerge.core import cosine_distances


def canonical(labels) -> np.ndarray:
    """Renumber a partition by order of first appearance, so equal partitions compare equal."""
    labels = np.asarray(labels)
    first: dict = {}
    return np.array([first.setdefault(value, len(first)) for value in labels.tolist()])


def scipy_partition(metric: torch.Tensor, k: int, method: str) -> list[np.ndarray]:
    """The reference partition of every sample: scipy linkage + fcluster(maxclust) on the
    float64 matrix :func:`sdmerge.core.cosine_distances` produces."""
    distances = cosine_distances(metric)
    return [
        canonical(fcluster(linkage(squareform(d.numpy(), checks=False), method), k, "maxclust"))
        for d in distances
    ]


def clustered_metric(batch: int, tokens: int, dim: int, centers: int, seed: int) -> torch.Tensor:
    """Tokens drawn around a few random centres: realistic, well-separated clusters."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(batch, centers, dim, generator=g) * 3
    which = torch.randint(centers, (batch, tokens), generator=g)
    return centre.gather(1, which[..., None].expand(-1, -1, dim)) + torch.randn(batch, tokens, dim, generator=g)
