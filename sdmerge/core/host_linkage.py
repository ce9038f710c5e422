"""Exact ATC on the host: each sample's condensed distances to fastcluster's linkage, then the cut.

fastcluster (D. Müllner, "fastcluster: Fast Hierarchical, Agglomerative Clustering Routines for
R and Python", J. Stat. Softw. 53(9), 2013) builds the same dendrograms as scipy's ``linkage``
(nearest-neighbour chain for average and complete linkage, a minimum spanning tree for single
linkage, O(N^2) time and O(N) memory beyond the condensed matrix, which it overwrites), in C++
without holding the GIL: the samples of a batch run in parallel threads, as many as torch's
intra-op threads. :func:`linkage_in_place` calls it without the copy its Python ``linkage``
makes; :func:`linkage_working_bytes` bounds the host memory it takes besides the distances.

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

# Host bytes per token and sample besides the condensed distances, an upper bound counted from
# fastcluster 1.3.0's source and this module: fastcluster's working arrays (at most 96: the
# merges 24, cluster sizes 8, the nearest-neighbour chain 8, the list of active nodes 16, the
# union-find 16, the sort's buffer 24; 8-byte indices), its output ``Z`` (32), the cut's index
# arrays (at most 112, ``Z`` still alive) and the labels (16: one row, then the stacked batch).
LINKAGE_BYTES_PER_TOKEN = 256


def linkage_working_bytes(batch: int, tokens: int) -> int:
    """Peak host bytes of :func:`host_linkage_labels` besides the condensed distances (which it
    clusters in place: the input itself on the host, its one host copy from another device), an
    upper bound: :data:`LINKAGE_BYTES_PER_TOKEN` per token of every sample (all may run at once)."""
    return LINKAGE_BYTES_PER_TOKEN * batch * tokens


def host_linkage_labels(condensed: Tensor, tokens: int, k: int, linkage: str) -> Tensor:
    """Labels ``[B, N]`` (0..k-1, numbered by first token) of the ``k``-cluster cut.

    ``condensed: [B, N (N - 1) / 2]`` float64 distances (scipy's layout), consumed (fastcluster
    works in it); it may live on any device (it is copied to the host). ``linkage``: single,
    complete or average. The labels are returned on ``condensed``'s device. On the host the
    distances are not copied (a CPU tensor's ``.numpy()`` shares its memory).
    """
    B = condensed.shape[0]
    if k == tokens:
        return torch.arange(tokens, device=condensed.device).expand(B, tokens).clone()
    samples = condensed.cpu().numpy()

    def labels_of(sample: np.ndarray) -> np.ndarray:
        return cut_linkage_matrix(linkage_in_place(sample, tokens, linkage), k)

    workers = min(B, torch.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            labels = list(pool.map(labels_of, samples))
    else:
        labels = [labels_of(sample) for sample in samples]
    return torch.from_numpy(np.stack(labels)).to(condensed.device)


def linkage_in_place(condensed: np.ndarray, tokens: int, linkage: str) -> np.ndarray:
    """fastcluster's linkage matrix ``Z: [N - 1, 4]`` (scipy's format) of one sample's condensed
    distances ``[N (N - 1) / 2]``, which it overwrites: ``fastcluster.linkage(condensed, linkage,
    preserve_input=False)`` without its copy.

    fastcluster 1.3.0's ``linkage`` begins with ``numpy.array(X)``, which copies whatever
    ``preserve_input`` says: twice the condensed matrix at the peak. Its C++ entry point
    ``linkage_wrap`` reads the array's memory as given, unchecked, hence the checks here.
    """
    size = tokens * (tokens - 1) // 2
    if not (
        condensed.dtype == np.float64
        and condensed.shape == (size,)
        and condensed.flags.c_contiguous
        and condensed.flags.writeable
        and tokens >= 2
    ):
        raise ValueError(
            f"fastcluster's in-place linkage needs a writable C-contiguous float64 vector of "
            f"{tokens} * {tokens - 1} / 2 = {size} condensed distances (at least 2 tokens); got "
            f"{condensed.dtype}, shape {condensed.shape}, C-contiguous "
            f"{condensed.flags.c_contiguous}, writable {condensed.flags.writeable}. Pass such a "
            "vector, e.g. np.array(condensed, np.float64, order='C')."
        )
    merges = np.empty((tokens - 1, 4))
    fastcluster.linkage_wrap(tokens, condensed, merges, fastcluster.mthidx[linkage])
    return merges


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
