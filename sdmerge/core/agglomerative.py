"""Exact agglomerative token clustering (ATC, Haurum et al. 2024), batched on the tensors' device.

ATC clusters tokens bottom-up on the cosine distance ``1 - cos(m_i, m_j)`` with single,
complete or average linkage (ATC eq. 1-3) until ``k`` clusters remain. The partition computed
here equals scipy's ``fcluster(linkage(d, method), k, "maxclust")`` on the same float64
distance matrix ``d`` (ties aside), for every sample of the batch at once.

Algorithm (reciprocal nearest neighbours, RNN):

* The three linkages are *reducible*: merging clusters ``i`` and ``j`` never brings the merged
  cluster closer to any ``x`` than ``min(d(x, i), d(x, j))``. Hence every pair of reciprocal
  nearest neighbours is a merge of the greedy dendrogram, and all such pairs can be merged in
  the same round. Distances to a merged cluster follow Lance-Williams:
  ``single: min(d_xi, d_xj)``, ``complete: max(d_xi, d_xj)``,
  ``average: (n_i d_xi + n_j d_xj) / (n_i + n_j)`` (the expression scipy evaluates).
  When two pairs merge in the same round, their mutual distance is computed from the
  2x2 block of old distances with an expression symmetric in the two pairs, so the matrix
  stays exactly symmetric.
* Nearest neighbours are kept exact (smallest distance, then smallest index), recomputing only
  rows whose neighbour was merged or that a new cluster ties or undercuts (single linkage
  keeps a merged neighbour: its distance is unchanged). With this tie-break the
  nearest-neighbour graph has no cycle longer than two, so a round always finds a pair.
* The linkages are monotone, so the ``k``-cluster cut consists of the ``N - k`` lowest merges
  of the dendrogram, and no future merge is lower than the current smallest distance: the
  loop stops once ``N - k`` recorded merges lie at or below it.
* The cut: merge ``j`` into ``i`` (``i < j``) records ``parent[j] = i``; keeping the ``N - k``
  lowest merges (height, then round) and following parents (pointer jumping) labels every
  token with the smallest token of its cluster.

The distance matrix is ``[B, N, N]``: float64 for average linkage (its updates are new
numbers, computed as scipy computes them), the metric's float32 for single/complete (their
updates only pick existing entries, so float32 storage is exact). Rows are processed in
chunks through preallocated buffers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .plan import MergePlan

LINKAGES = ("single", "complete", "average")
_INF = math.inf
_CHUNK_ELEMENTS = 1 << 20  # row-chunk buffers hold at most this many distances
_DISTANCE_BLOCK = 512  # rows per matrix-product block when building distances


def check_linkage(linkage: str) -> str:
    if linkage not in LINKAGES:
        raise ValueError(f"unknown linkage {linkage!r}; allowed: {', '.join(LINKAGES)}")
    return linkage


@torch.no_grad()
def cosine_distances(metric: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Cosine distances ``1 - cos(m_i, m_j)``: ``[B, N, D] -> [B, N, N]``, zero diagonal, no gradient.

    The products are computed in float32 (float64 if ``metric`` is float64), then stored as
    ``dtype``. The matrix is exactly symmetric: only the upper triangle is computed (by blocks
    of rows) and mirrored. This is the matrix whose scipy clustering :func:`cluster` reproduces.
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
        out[:, start:stop, start:].copy_(part)
        out[:, start:, start:stop].copy_(part.transpose(-1, -2))
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


def _working_dtype(metric_dtype: torch.dtype, linkage: str) -> torch.dtype:
    if linkage == "average" or metric_dtype == torch.float64:
        return torch.float64
    return torch.float32


def cluster(metric: Tensor, k: int, linkage: str = "average") -> Tensor:
    """Agglomerative clustering of every sample's tokens into ``k`` clusters.

    Args:
        metric: ``[B, N, D]`` token features; cosine distance is used.
        k: number of clusters, ``1 <= k <= N``.
        linkage: ``"single"``, ``"complete"`` or ``"average"``.

    Returns:
        ``labels: [B, N]`` int64 in ``0..k-1``, every label used, clusters numbered by their
        first token. Equal (up to renumbering) to scipy's
        ``fcluster(linkage(squareform(cosine_distances(metric)[b]), linkage), k, "maxclust")``.
    """
    check_linkage(linkage)
    if metric.dim() != 3:
        raise ValueError(f"metric must be [B, N, D], got shape {tuple(metric.shape)}")
    N = metric.shape[1]
    if not 1 <= k <= N:
        raise ValueError(f"k={k} clusters requested for {N} tokens; allowed: 1 <= k <= {N}")
    distances = cosine_distances(metric, _working_dtype(metric.dtype, linkage))
    return agglomerative_labels(distances, k, linkage)


def agglomerative_clustering(
    metric: Tensor, remove: int, linkage: str = "average", protected: int = 0, sizes: Tensor | None = None
) -> MergePlan:
    """ATC as a merge plan: cluster the non-protected tokens so that ``remove`` tokens disappear.

    Args:
        metric: ``[B, N, D]``; tokens ``0..protected-1`` keep groups of their own.
        remove: ``0 <= remove <= N - protected - 1``.
        sizes: ``[B, N]`` token sizes carried into the plan.

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
    labels = cluster(metric[:, protected:], free - remove, linkage) + protected
    prefix = torch.arange(protected, device=metric.device).expand(B, protected)
    return MergePlan(torch.cat([prefix, labels], dim=1), N - remove, sizes)


@torch.no_grad()
def agglomerative_labels(distances: Tensor, k: int, linkage: str) -> Tensor:
    """Cluster labels ``[B, N]`` from a distance matrix ``[B, N, N]``, which is consumed (overwritten)."""
    return _Agglomeration(distances, linkage).run(k)


def _lance_williams_(a: Tensor, b: Tensor, size_a: Tensor, size_b: Tensor, linkage: str) -> Tensor:
    """In place into ``a``: distances to the union of clusters a and b (``[P, N]`` rows, sizes ``[P, 1]``)."""
    if linkage == "average":
        return a.mul_(size_a).add_(b.mul_(size_b)).div_(size_a + size_b)
    if linkage == "complete":
        return torch.maximum(a, b, out=a)
    return torch.minimum(a, b, out=a)


def _pair_distance(a, b, c, d, n_ip, n_jp, n_iq, n_jq, linkage: str) -> Tensor:
    """Distance between (i_p u j_p) and (i_q u j_q) from the old block
    ``a = d(i_p, i_q), b = d(i_p, j_q), c = d(j_p, i_q), d = d(j_p, j_q)``; symmetric in p <-> q."""
    if linkage == "average":
        return ((n_ip * n_iq * a + n_jp * n_jq * d) + (n_ip * n_jq * b + n_jp * n_iq * c)) / (
            (n_ip + n_jp) * (n_iq + n_jq)
        )
    if linkage == "complete":
        return torch.maximum(torch.maximum(a, d), torch.maximum(b, c))
    return torch.minimum(torch.minimum(a, d), torch.minimum(b, c))


class _Agglomeration:
    """State of the batched RNN clustering. Slots are token positions; slot ``i`` holds the
    cluster whose smallest token is ``i``. Inactive slots have +inf rows and columns."""

    def __init__(self, distances: Tensor, linkage: str):
        B, N, _ = distances.shape
        self.D, self.linkage, self.B, self.N = distances, linkage, B, N
        device, dtype = distances.device, distances.dtype
        distances.diagonal(dim1=-2, dim2=-1).fill_(_INF)
        self.rows = distances.view(B * N, N)
        self.positions = torch.arange(N, device=device)
        self.active = torch.ones(B, N, dtype=torch.bool, device=device)
        self.size = torch.ones(B, N, dtype=dtype, device=device)
        self.nn_dist, self.nn = distances.min(dim=-1)
        self.height = torch.full((B, N), _INF, dtype=dtype, device=device)  # indexed by the absorbed slot
        self.round = torch.zeros(B, N, dtype=torch.int64, device=device)
        self.parent = self.positions.expand(B, N).clone()
        chunk = max(1, min(B * N, _CHUNK_ELEMENTS // N))
        self.chunk = chunk
        self.buffer_a = torch.empty(chunk, N, dtype=dtype, device=device)
        self.buffer_b = torch.empty(chunk, N, dtype=dtype, device=device)
        self.column_index = torch.empty(N, chunk, dtype=torch.int64, device=device)
        self.column_value = torch.empty(N, chunk, dtype=dtype, device=device)
        if linkage == "single":  # buffers of the tie check in _write_columns
            self.candidate = torch.empty(chunk, N, dtype=torch.int64, device=device)
            self.tie = torch.empty(chunk, N, dtype=torch.bool, device=device)
            self.no_slot = torch.tensor(N, device=device)
        self.column_step = (self.positions * N).unsqueeze(1)  # [N, 1] offsets along a column

    def run(self, k: int) -> Tensor:
        B, N = self.B, self.N
        need = N - k
        done = torch.full((B,), need == 0, dtype=torch.bool, device=self.D.device)
        step = 0
        while not bool(done.all()):
            step += 1
            pairs = (self.nn.gather(1, self.nn) == self.positions) & (self.positions < self.nn)
            pairs &= self.active & ~done.unsqueeze(1)
            if not self._merge_round(pairs, step):
                break
            lowest = self.nn_dist.min(dim=-1).values
            done |= (self.height <= lowest.unsqueeze(1)).sum(dim=-1) >= need
        return self._cut(need)

    def _merge_round(self, pairs: Tensor, step: int) -> bool:
        """Merge every reciprocal pair marked in ``pairs: [B, N]``; False if there is none."""
        b, i = pairs.nonzero(as_tuple=True)
        if b.numel() == 0:
            return False
        N, D = self.N, self.D
        j = self.nn[b, i]
        self.height[b, j] = self.nn_dist[b, i]
        self.round[b, j] = step
        self.parent[b, j] = i
        # For each pair, the (padded) list of the pairs merged in the same sample this round.
        same_i, same_j = self._pairs_of_sample(pairs, b)
        size_i, size_j = self.size[b, i].unsqueeze(1), self.size[b, j].unsqueeze(1)
        same_size_i, same_size_j = self.size[b.unsqueeze(1), same_i], self.size[b.unsqueeze(1), same_j]
        self.active[b, j] = False
        flat_i, flat_j = b * N + i, b * N + j
        block = torch.empty(same_i.shape, dtype=D.dtype, device=D.device)
        undercut = torch.full((self.B, N), _INF, dtype=D.dtype, device=D.device)
        for s in range(0, b.numel(), self.chunk):
            e = min(b.numel(), s + self.chunk)
            row_i, row_j = self.buffer_a[: e - s], self.buffer_b[: e - s]
            torch.index_select(self.rows, 0, flat_i[s:e], out=row_i)
            torch.index_select(self.rows, 0, flat_j[s:e], out=row_j)
            qi, qj = same_i[s:e], same_j[s:e]
            block[s:e] = _pair_distance(
                row_i.gather(1, qi), row_i.gather(1, qj), row_j.gather(1, qi), row_j.gather(1, qj),
                size_i[s:e], size_j[s:e], same_size_i[s:e], same_size_j[s:e], self.linkage,
            )
            _lance_williams_(row_i, row_j, size_i[s:e], size_j[s:e], self.linkage)
            self.rows.index_copy_(0, flat_i[s:e], row_i)
            undercut.scatter_reduce_(0, b[s:e].unsqueeze(1).expand_as(row_i), row_i, "amin")
        undercut_index = self._write_columns(b, i, j, flat_i, undercut)
        block.masked_fill_(same_i == i.unsqueeze(1), _INF)
        D[b.unsqueeze(1), i.unsqueeze(1), same_i] = block  # columns same_j are +inf already
        self.size[b, i] = (size_i + size_j).squeeze(1)
        self._refresh_neighbours(b, i, j, undercut, undercut_index)
        return True

    def _pairs_of_sample(self, pairs: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """``[P, Pmax]`` slots i and j of the pairs in each pair's sample (padded by repeating the last)."""
        counts = pairs.sum(dim=-1)
        most = int(counts.max())
        key = torch.where(pairs, self.positions, self.N)
        same_i = key.sort(dim=-1).values[:, :most]
        last = same_i.gather(1, (counts - 1).clamp_min(0).unsqueeze(1))
        # Samples without a pair pad with N; they are never selected by ``b``, clamp to stay in range.
        same_i = torch.where(same_i == self.N, last, same_i).clamp_max(self.N - 1)
        same_j = self.nn.gather(1, same_i)
        return same_i[b], same_j[b]

    def _write_columns(self, b: Tensor, i: Tensor, j: Tensor, flat_i: Tensor, undercut: Tensor) -> Tensor:
        """Mirror the new rows ``i`` into columns ``i``; columns of absorbed slots ``j`` become +inf.

        Single linkage also needs, for every slot, the smallest new cluster ``i`` at distance
        ``undercut`` (``N`` where none): it is read off the same rows and returned (else ``None``).
        """
        flat = self.D.view(-1)
        N, NN = self.N, self.N * self.N
        single = self.linkage == "single"
        undercut_index = torch.full((self.B, N), N, dtype=torch.int64, device=self.D.device) if single else None
        for s in range(0, b.numel(), self.chunk):
            e = min(b.numel(), s + self.chunk)
            rows, index, values = self.buffer_a[: e - s], self.column_index[:, : e - s], self.column_value[:, : e - s]
            torch.index_select(self.rows, 0, flat_i[s:e], out=rows)
            if single:
                lowest = self.buffer_b[: e - s]
                torch.index_select(undercut, 0, b[s:e], out=lowest)
                tie = torch.eq(rows, lowest, out=self.tie[: e - s])
                candidate = torch.where(tie, i[s:e].unsqueeze(1), self.no_slot, out=self.candidate[: e - s])
                undercut_index.scatter_reduce_(0, b[s:e].unsqueeze(1).expand_as(candidate), candidate, "amin")
            values.copy_(rows.t())
            torch.add(self.column_step, (b[s:e] * NN + i[s:e]).unsqueeze(0), out=index)
            flat.index_copy_(0, index.reshape(-1), values.reshape(-1))
            torch.add(self.column_step, (b[s:e] * NN + j[s:e]).unsqueeze(0), out=index)
            flat.index_fill_(0, index.reshape(-1), _INF)
        return undercut_index

    def _refresh_neighbours(
        self, b: Tensor, i: Tensor, j: Tensor, undercut: Tensor, undercut_index: Tensor | None
    ) -> None:
        """Keep every active slot's nearest neighbour exact (smallest distance, then index).

        ``undercut``: per slot, the smallest distance to a new cluster. Recomputed: new clusters,
        and rows that a new cluster undercuts or ties. Complete and average linkage also
        recompute rows whose neighbour was merged (their distance to it changed). Single linkage
        keeps such a neighbour, now slot ``i`` (``min(d_ki, d_kj)`` is the old distance), and
        recomputes a tie only when the tying new cluster has a smaller index (``undercut_index``).
        """
        if undercut_index is not None:  # single linkage
            redirect = self.positions.expand(self.B, self.N).clone()
            redirect[b, j] = i
            self.nn = redirect.gather(1, self.nn)
            stale = (undercut < self.nn_dist) | ((undercut == self.nn_dist) & (undercut_index < self.nn))
        else:
            merged = torch.zeros_like(self.active)
            merged[b, i] = True
            merged[b, j] = True
            stale = merged.gather(1, self.nn) | (undercut <= self.nn_dist)
        stale &= self.active
        stale[b, i] = True
        self.nn_dist.masked_fill_(~self.active, _INF)
        sb, sk = stale.nonzero(as_tuple=True)
        flat = sb * self.N + sk
        for s in range(0, flat.numel(), self.chunk):
            e = min(flat.numel(), s + self.chunk)
            rows = self.buffer_a[: e - s]
            torch.index_select(self.rows, 0, flat[s:e], out=rows)
            value, index = rows.min(dim=-1)
            self.nn_dist[sb[s:e], sk[s:e]] = value
            self.nn[sb[s:e], sk[s:e]] = index

    def _cut(self, need: int) -> Tensor:
        """Labels after the ``need`` lowest merges (by height, then round)."""
        B, N = self.B, self.N
        by_round = torch.sort(self.round, dim=-1, stable=True).indices
        by_height = torch.sort(self.height.gather(1, by_round), dim=-1, stable=True).indices
        order = by_round.gather(1, by_height)
        rank = torch.empty_like(order).scatter_(1, order, self.positions.expand(B, N).contiguous())
        pointer = torch.where(rank < need, self.parent, self.positions)
        for _ in range(max(1, math.ceil(math.log2(N)))):
            pointer = pointer.gather(1, pointer)
        first_token = pointer == self.positions
        return (first_token.cumsum(dim=-1) - 1).gather(1, pointer)
