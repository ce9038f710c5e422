"""Exact ATC on the host: each sample's condensed distances to fastcluster's linkage, then the cut.

fastcluster (D. Müllner, "fastcluster: Fast Hierarchical, Agglomerative Clustering Routines for
R and Python", J. Stat. Softw. 53(9), 2013) builds the same dendrograms as scipy's ``linkage``
(nearest-neighbour chain for average and complete linkage, a minimum spanning tree for single
linkage, O(N^2) time and no memory beyond the condensed matrix, which it overwrites), in C++
without holding the GIL: the samples of a batch run in parallel threads, as many as torch's
intra-op threads.

Heights. Single and complete linkage only pick existing distances: their merges are scipy's
bit for bit. For average linkage fastcluster evaluates Lance-Williams as ``s d_xa + t d_xb``
with ``s = n_a / (n_a + n_b)``, ``t = n_b / (n_a + n_b)``, where scipy evaluates
``(n_a d_xa + n_b d_xb) / (n_a + n_b)``: heights agree to a few units in the last place, so the
partition is scipy's unless two merges at the cut lie that close (the tests' cases never do).
Exact ties at the cut are broken as scipy breaks them only up to this: as everywhere in
:mod:`sdmerge.core.agglomerative`, ties aside.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import fastcluster
import numpy as np
import torch
from torch import Tensor


def host_linkage_labels(condensed: Tensor, tokens: int, k: int, linkage: str) -> Tensor:
    """Labels ``[B, N]`` (0..k-1, numbered by first token) of the ``k``-cluster cut.

    ``condensed: [B, N (N - 1) / 2]`` float64 distances (scipy's layout), consumed (fastcluster
    works in it); it may live on any device (it is copied to the host). ``linkage``: single,
    complete or average. The labels are returned on ``condensed``'s device.
    """
    B = condensed.shape[0]
    if k == tokens:
        return torch.arange(tokens, device=condensed.device).expand(B, tokens).clone()
    samples = condensed.cpu().numpy()

    def labels_of(sample: np.ndarray) -> np.ndarray:
        merges = fastcluster.linkage(sample, linkage, preserve_input=False)
        return cut_linkage_matrix(merges, k)

    workers = min(B, torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            labels = list(pool.map(labels_of, samples))
    else:
        labels = [labels_of(sample) for sample in samples]
    return torch.from_numpy(np.stack(labels)).to(condensed.device)


def cut_linkage_matrix(z: np.ndarray, k: int) -> np.ndarray:
    """Labels ``[N]`` (0..k-1, numbered by first token) after the first ``N - k`` merges of a
    scipy-style linkage matrix ``z`` (rows sorted by height; row ``m`` joins nodes ``z[m, 0]``
    and ``z[m, 1]`` into node ``N + m``). Exactly ``k`` clusters even when heights tie at the
    cut, where ``fcluster(maxclust)`` can give fewer; otherwise the same partition."""
    N = z.shape[0] + 1
    merges = N - k
    parent = np.arange(2 * N - 1)
    joined = z[:merges, :2].astype(np.int64)
    parent[joined] = N + np.arange(merges)[:, None]
    for _ in range(max(1, math.ceil(math.log2(N)))):  # pointer jumping: each node to its root
        parent = parent[parent]
    roots, first_token, inverse = np.unique(parent[:N], return_index=True, return_inverse=True)
    rank = np.empty(len(roots), dtype=np.int64)
    rank[np.argsort(first_token)] = np.arange(len(roots))
    return rank[inverse.reshape(N)]
