"""Exact agglomerative token clustering (ATC, Haurum et al. 2024): the public API, distances, paths.

ATC clusters tokens bottom-up on the cosine distance ``1 - cos(m_i, m_j)`` with single,
complete or average linkage (ATC eq. 1-3) until ``k`` clusters remain. The partition computed
here equals scipy's ``fcluster(linkage(d, method), k, "maxclust")`` on the same float64
distance matrix ``d`` (ties aside), for every sample of the batch at once, on the tensors'
device. The merge rounds are in :mod:`sdmerge.core.rnn_rounds`.

Paths (``path=``), both exact, differing in how nearest neighbours are refreshed after a round:
``"accelerator"`` recomputes them with one ``min`` over the whole matrix (one host
synchronisation per round, a fixed sequence of operations); ``"cpu"`` recomputes only the rows
that can have changed (two synchronisations per round, far less memory traffic). ``"auto"``
picks ``"cpu"`` for CPU tensors and ``"accelerator"`` for any other device.

Single linkage on the ``"cpu"`` path does not run merge rounds (chain-like clusters need many
of them: about 170 at 4096 random tokens): each sample's matrix goes, on the host, to scipy's
minimum-spanning-tree routine (``scipy.cluster.hierarchy.linkage(..., "single")``), the same
routine as the reference, on the same matrix; the cut keeps its ``N - k`` lowest merges.

The distance matrix is ``[B, N, N]``: float64 for average linkage (its updates are new
numbers, computed as scipy computes them), the metric's float32 for single/complete (their
updates only pick existing entries, so float32 storage is exact). Before it is allocated,
:func:`cluster` checks that it and the rounds' working rows fit in the device's free memory.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import linkage as scipy_linkage
from scipy.spatial.distance import squareform
from torch import Tensor

from .device_memory import available_bytes
from .opaque import is_compiling, opaque_agglomerative_labels
from .plan import MergePlan
from .rnn_rounds import GROUP_TOKENS, rnn_labels

LINKAGES = ("single", "complete", "average")
PATHS = ("auto", "cpu", "accelerator")
_NEIGHBOURS = {"cpu": "touched", "accelerator": "dense"}
_DISTANCE_BLOCK = 512  # rows per matrix-product block when building distances


class ClusteringMemoryError(MemoryError):
    """The N x N distance matrix of exact clustering does not fit in the device's free memory."""


def check_linkage(linkage: str) -> str:
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; allowed: {', '.join(LINKAGES)}")
    return linkage


def resolve_path(path: str, device: torch.device) -> str:
    """``"cpu"`` or ``"accelerator"`` for ``path`` (one of :data:`PATHS`) on ``device``."""
    if not isinstance(path, str) or path not in PATHS:
        raise ValueError(f"unknown clustering path {path!r}; allowed: {', '.join(PATHS)}")
    if path == "auto":
        return "cpu" if device.type == "cpu" else "accelerator"
    return path


def clustering_bytes(batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Peak bytes of exact clustering (an upper bound): the ``[B, N, N]`` matrix, the working rows
    of a round and their temporaries (the rows of both clusters of every pair: at most ``N / 2``
    pairs per sample, so at most two more ``B N N`` entries), and the blocks of distances between
    the pairs of a round (three ``P x P`` blocks, ``P`` at most half of
    ``max(rnn_rounds.GROUP_TOKENS, N)``)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    pairs = max(GROUP_TOKENS, tokens) // 2
    return itemsize * (3 * batch * tokens * tokens + 3 * pairs * pairs)


def check_memory(batch: int, tokens: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise :class:`ClusteringMemoryError` if :func:`clustering_bytes` exceeds the free memory
    of ``device`` (devices whose free memory cannot be told are not checked)."""
    needed = clustering_bytes(batch, tokens, dtype)
    available = available_bytes(device)
    if available is not None and needed > available:
        raise ClusteringMemoryError(
            f"exact agglomerative clustering of {tokens} tokens, batch {batch}, needs "
            f"{needed / 2**30:.2f} GiB on {device} (a {tokens}x{tokens} {dtype} distance matrix per "
            f"sample and its working rows), but only {available / 2**30:.2f} GiB is available. "
            "Use fewer tokens (a smaller max_downsample or resolution), a smaller batch, or a "
            "method without an N x N matrix, such as 'tome'."
        )


@torch.no_grad()
def cosine_distances(metric: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Cosine distances ``1 - cos(m_i, m_j)``: ``[B, N, D] -> [B, N, N]``, zero diagonal, no gradient.

    The products are computed in float32 (float64 if ``metric`` is float64), then stored as
    ``dtype``. The matrix is exactly symmetric: only the upper triangle is computed, by blocks of
    rows (each block's square part made symmetric by the smaller of its two products, whatever
    the matrix library's summation order), and mirrored. This is the matrix whose scipy
    clustering :func:`cluster` reproduces, on every path.
    """
    B, N, _ = metric.shape
    compute = torch.float64 if metric.dtype == torch.float64 else torch.float32
    unit = F.normalize(metric.to(compute), dim=-1)
    out = torch.empty(B, N, N, dtype=dtype, device=metric.device)
    block = min(N, _DISTANCE_BLOCK)
    buffer = torch.empty(B * block * N, dtype=compute, device=metric.device)
    one = torch.ones((), dtype=compute, device=metric.device)
    for start in range(0, N, block):
        stop = min(N, start + block)
        part = buffer[: B * (stop - start) * (N - start)].view(B, stop - start, N - start)
        torch.baddbmm(one, unit[:, start:stop], unit[:, start:].transpose(-1, -2), alpha=-1, out=part)
        square = part[:, :, : stop - start]
        square.copy_(torch.minimum(square, square.transpose(-1, -2)))
        out[:, start:stop, start:].copy_(part)
        out[:, start:, start:stop].copy_(part.transpose(-1, -2))
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def _working_dtype(metric_dtype: torch.dtype, linkage: str) -> torch.dtype:
    if linkage == "average" or metric_dtype == torch.float64:
        return torch.float64
    return torch.float32


def cluster(metric: Tensor, k: int, linkage: str = "average", *, path: str = "auto") -> Tensor:
    """Agglomerative clustering of every sample's tokens into ``k`` clusters.

    Args:
        metric: ``[B, N, D]`` token features; cosine distance is used.
        k: number of clusters, an int with ``1 <= k <= N``.
        linkage: ``"single"``, ``"complete"`` or ``"average"``.
        path: ``"auto"``, ``"cpu"`` or ``"accelerator"`` (see the module docstring); every path
            gives the same partition, on any device.

    Returns:
        ``labels: [B, N]`` int64 in ``0..k-1``, every label used, clusters numbered by their
        first token. Equal (up to renumbering) to scipy's
        ``fcluster(linkage(squareform(cosine_distances(metric)[b]), linkage), k, "maxclust")``.

    Raises:
        ClusteringMemoryError: the distance matrix and working rows do not fit the device.
    """
    return cluster_with_rounds(metric, k, linkage, path=path)[0]


def cluster_with_rounds(metric: Tensor, k: int, linkage: str = "average", *, path: str = "auto") -> tuple[Tensor, int]:
    """:func:`cluster`, also returning the number of merge rounds it ran (0 for single linkage on
    the ``"cpu"`` path, which runs none)."""
    check_linkage(linkage)
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, D], got shape {tuple(metric.shape)}")
    B, N, _ = metric.shape
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k={k!r} must be an int number of clusters, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= N:
        raise ValueError(f"k={k} clusters requested for {N} tokens; allowed: 1 <= k <= {N}")
    path = resolve_path(path, metric.device)
    dtype = _working_dtype(metric.dtype, linkage)
    check_memory(B, N, dtype, metric.device)
    return _labels_and_rounds(cosine_distances(metric, dtype), k, linkage, path)


def _labels_and_rounds(distances: Tensor, k: int, linkage: str, path: str) -> tuple[Tensor, int]:
    """Labels and merge rounds from a distance matrix (consumed) on a resolved path."""
    if path == "cpu" and linkage == "single":
        return _minimum_spanning_tree_labels(distances, k), 0
    return rnn_labels(distances, k, linkage, _NEIGHBOURS[path])


def _minimum_spanning_tree_labels(distances: Tensor, k: int) -> Tensor:
    """Single linkage on the host, one sample at a time: scipy's minimum-spanning-tree linkage of
    the upper triangle (as the reference computes it), then the ``N - k`` lowest merges."""
    B, N, _ = distances.shape
    if k == N:
        return torch.arange(N, device=distances.device).expand(B, N).clone()
    samples = [scipy_linkage(squareform(d, checks=False), "single") for d in distances.cpu().numpy()]
    return torch.from_numpy(np.stack([_cut_linkage_matrix(z, k) for z in samples])).to(distances.device)


def _cut_linkage_matrix(z: np.ndarray, k: int) -> np.ndarray:
    """Labels ``[N]`` (0..k-1, numbered by first token) after the first ``N - k`` merges of a
    scipy linkage matrix ``z`` (rows sorted by height; row ``m`` joins nodes ``z[m, 0]`` and
    ``z[m, 1]`` into node ``N + m``). Exactly ``k`` clusters even when heights tie at the cut,
    where ``fcluster(maxclust)`` can give fewer; otherwise the same partition."""
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


def agglomerative_clustering(
    metric: Tensor,
    remove: int,
    linkage: str = "average",
    protected: int = 0,
    sizes: Tensor | None = None,
    *,
    path: str = "auto",
) -> MergePlan:
    """ATC as a merge plan: cluster the non-protected tokens so that ``remove`` tokens disappear.

    Args:
        metric: ``[B, N, D]``; tokens ``0..protected-1`` keep groups of their own.
        remove: ``0 <= remove <= N - protected - 1``.
        sizes: ``[B, N]`` token sizes carried into the plan.
        path: the clustering path, as in :func:`cluster`.

    Returns a plan with ``N - remove`` groups (protected tokens first).
    """
    check_linkage(linkage)
    B, N, _ = metric.shape
    free = N - protected
    if not 0 <= remove <= max(free - 1, 0):
        raise ValueError(
            f"agglomerative clustering can remove at most {max(free - 1, 0)} of {N} tokens "
            f"({protected} protected, one cluster must remain), asked to remove {remove}"
        )
    if remove == 0:
        return MergePlan.identity(B, N, sizes=sizes, device=metric.device)
    if is_compiling() and opaque_agglomerative_labels is not None:  # one opaque op in the graph (sdmerge.core.opaque)
        return MergePlan(opaque_agglomerative_labels(metric.detach(), remove, linkage, protected), N - remove, sizes)
    labels = cluster(metric[:, protected:], free - remove, linkage, path=path) + protected
    prefix = torch.arange(protected, device=metric.device).expand(B, protected)
    return MergePlan(torch.cat([prefix, labels], dim=1), N - remove, sizes)


def agglomerative_labels(distances: Tensor, k: int, linkage: str, *, path: str = "auto") -> Tensor:
    """Cluster labels ``[B, N]`` from a distance matrix ``[B, N, N]``, which is consumed (overwritten)."""
    check_linkage(linkage)
    return _labels_and_rounds(distances, k, linkage, resolve_path(path, distances.device))[0]
