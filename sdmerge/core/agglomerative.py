"""Exact agglomerative token clustering (ATC, Haurum et al. 2024): the public API and its paths.

ATC clusters tokens bottom-up on the cosine distance ``1 - cos(m_i, m_j)`` with single,
complete or average linkage (ATC eq. 1-3) until ``k`` clusters remain. The partition computed
here equals scipy's ``fcluster(linkage(d, method), k, "maxclust")`` on the same float64
distance matrix ``d`` (:mod:`sdmerge.core.distances`; ties aside), for every sample of the batch.

Paths (``path=``), both exact:

* ``"cpu"`` (:mod:`sdmerge.core.host_linkage`): the condensed upper triangle of each sample's
  matrix (half the memory, never square) goes to fastcluster's C++ linkage on the host, the
  samples in parallel threads. Reference-grade and the fastest on a CPU; no merge rounds.
* ``"accelerator"`` (:mod:`sdmerge.core.rnn_rounds`): the square ``[B, N, N]`` matrix stays on
  the tensors' device and is clustered by rounds of reciprocal nearest neighbours, a fixed
  sequence of whole-batch operations and one host synchronisation per round (float64 for
  average linkage, whose updates are new numbers computed as scipy computes them; the metric's
  float32 for single/complete, whose updates only pick existing entries).

``"auto"`` picks ``"cpu"`` for CPU tensors and ``"accelerator"`` for any other device; either
path runs on any device (``"cpu"`` copies the condensed distances to the host). Before the
distances are allocated, :func:`cluster` checks that they and the working memory fit in the
free memory of the device and, for ``"cpu"``, of the host, less a margin on the host
(:func:`check_memory`).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from .device_memory import available_bytes, margin_bytes
from .distances import condensed_bytes, condensed_cosine_distances, cosine_distances, working_bytes
from .host_linkage import host_linkage_labels, linkage_working_bytes
from .opaque import is_compiling, opaque_agglomerative_labels
from .plan import MergePlan
from .rnn_rounds import GROUP_TOKENS, rnn_labels

LINKAGES = ("single", "complete", "average")
PATHS = ("auto", "cpu", "accelerator")
# What a clustering call allocates that is too small to count one by one: the interpreter's
# objects, worker threads' stacks, allocators' partly used pages (together well under this).
SMALL_ALLOCATIONS_BYTES = 2**20


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


def clustering_bytes(
    batch: int, tokens: int, features: int, metric_dtype: torch.dtype, dtype: torch.dtype, path: str = "accelerator"
) -> int:
    """Peak bytes of exact clustering of a ``[B, N, D]`` metric of ``metric_dtype`` whose tensors
    and clustering share one device's memory, an upper bound: the distances stored as ``dtype``,
    the larger of what building them (:func:`~sdmerge.core.distances.working_bytes`) and
    clustering them add, one after the other, and :data:`SMALL_ALLOCATIONS_BYTES`.

    ``"accelerator"``: the ``[B, N, N]`` matrix; clustering adds the working rows of a round and
    their temporaries (the rows of both clusters of every pair: at most ``N / 2`` pairs per
    sample, so at most two more ``B N N`` entries) and the blocks of distances between the pairs
    of a round (three ``P x P`` blocks, ``P`` at most half of ``max(rnn_rounds.GROUP_TOKENS, N)``).
    ``"cpu"`` (``dtype`` float64), on the host: the condensed distances ``B N (N - 1) / 2``,
    which fastcluster clusters in place; it adds its working arrays and the cut
    (:func:`~sdmerge.core.host_linkage.linkage_working_bytes`).
    """
    build = working_bytes(batch, tokens, features, metric_dtype)
    if path == "cpu":
        distances, clustering = condensed_bytes(batch, tokens), linkage_working_bytes(batch, tokens)
    else:
        itemsize = torch.empty((), dtype=dtype).element_size()
        pairs = max(GROUP_TOKENS, tokens) // 2
        distances = itemsize * batch * tokens * tokens
        clustering = itemsize * (2 * batch * tokens * tokens + 3 * pairs * pairs)
    return distances + max(build, clustering) + SMALL_ALLOCATIONS_BYTES


def check_memory(metric: Tensor, dtype: torch.dtype, path: str) -> None:
    """Raise :class:`ClusteringMemoryError` unless exact clustering of ``metric: [B, N, D]``, its
    distances stored as ``dtype`` (float64 on the ``"cpu"`` path), fits, in every memory it
    uses, in the available bytes less the margin (:func:`~sdmerge.core.device_memory.margin_bytes`:
    a share kept free on the host, whose exhaustion kills the process): :func:`clustering_bytes`
    on ``metric``'s device; on the ``"cpu"`` path from another device, the condensed distances
    and building them on the device, and their host copy and fastcluster on the host. Devices
    whose free memory cannot be told are not checked."""
    (batch, tokens, features), device, host = metric.shape, metric.device, torch.device("cpu")
    if path == "cpu" and device.type != host.type:
        each = condensed_bytes(batch, tokens) + SMALL_ALLOCATIONS_BYTES  # the distances, or their host copy
        needs = {
            device: each + working_bytes(batch, tokens, features, metric.dtype),
            host: each + linkage_working_bytes(batch, tokens),
        }
    else:
        needs = {device: clustering_bytes(batch, tokens, features, metric.dtype, dtype, path)}
    for where, needed in needs.items():
        available = available_bytes(where)
        if available is None:
            continue
        margin = margin_bytes(where, available)
        if needed <= available - margin:
            continue
        layout = "the upper triangle of" if path == "cpu" else "a"
        kept = f", {margin / 2**30:.2f} GiB of which is kept free" if margin else ""
        raise ClusteringMemoryError(
            f"exact agglomerative clustering of {tokens} tokens, batch {batch}, needs "
            f"{needed / 2**30:.2f} GiB on {where} ({layout} {tokens}x{tokens} {dtype} distance matrix per "
            f"sample and working memory), but only {available / 2**30:.2f} GiB is available{kept}. "
            "Use fewer tokens (a smaller max_downsample or resolution), a smaller batch, or a "
            "method without an N x N matrix, such as 'tome'."
        )


def _working_dtype(metric_dtype: torch.dtype, linkage: str) -> torch.dtype:
    """The accelerator path's matrix dtype (see the module docstring)."""
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
    """:func:`cluster`, also returning the number of merge rounds it ran (0 on the ``"cpu"`` path,
    which runs none)."""
    check_linkage(linkage)
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, D], got shape {tuple(metric.shape)}")
    N = metric.shape[1]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k={k!r} must be an int number of clusters, got {type(k).__name__}")
    k = int(k)
    if not 1 <= k <= N:
        raise ValueError(f"k={k} clusters requested for {N} tokens; allowed: 1 <= k <= {N}")
    path = resolve_path(path, metric.device)
    if path == "cpu":
        check_memory(metric, torch.float64, path)
        return host_linkage_labels(condensed_cosine_distances(metric), N, k, linkage), 0
    dtype = _working_dtype(metric.dtype, linkage)
    check_memory(metric, dtype, path)
    return rnn_labels(cosine_distances(metric, dtype), k, linkage)


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
    """Cluster labels ``[B, N]`` from a symmetric distance matrix ``[B, N, N]``, which is consumed
    (overwritten) on the accelerator path."""
    check_linkage(linkage)
    B, N, _ = distances.shape
    if resolve_path(path, distances.device) == "cpu":
        above_diagonal = torch.ones(N, N, dtype=torch.bool, device=distances.device).triu_(1)
        condensed = distances.masked_select(above_diagonal).view(B, -1).to(torch.float64)
        return host_linkage_labels(condensed, N, k, linkage)
    return rnn_labels(distances, k, linkage)[0]
