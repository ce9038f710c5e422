"""Exact agglomerative clustering of a batch of distance matrices by rounds of reciprocal nearest neighbours.

Input: a symmetric distance matrix ``[B, N, N]`` per batch; output: labels ``[B, N]`` of the
``k``-cluster cut, equal to scipy's ``fcluster(linkage(squareform(d), method), k, "maxclust")``.

* Single, complete and average linkage (ATC eq. 1-3) are *reducible*: merging clusters ``i``
  and ``j`` never brings the union closer to any ``x`` than ``min(d(x, i), d(x, j))``. Hence
  every pair of reciprocal nearest neighbours is a merge of the greedy dendrogram, and all such
  pairs merge in the same round. Distances to a union follow Lance-Williams, evaluated as scipy
  evaluates them: ``single: min(d_xi, d_xj)``, ``complete: max(d_xi, d_xj)``,
  ``average: (n_i d_xi + n_j d_xj) / (n_i + n_j)``. Two unions ``p``, ``q`` of the same round
  get their distance by Lance-Williams applied twice, as scipy computes it when the pair with
  the smaller slot merges first; both entries ``(p, q)`` and ``(q, p)`` take that value, so the
  matrix stays exactly symmetric.
* Slot ``i`` holds the cluster whose smallest token is ``i``; absorbed slots are never nearest
  neighbours again (``"dense"``: their columns and rows become +inf; ``"touched"``: rows read
  are masked by the active slots, absorbed columns are never written). Nearest neighbours are
  exact (smallest distance, then smallest index: ``torch.min``'s first minimum), so the
  nearest-neighbour graph has no cycle longer than two and every round with two or more
  clusters left finds a pair.
* A round is one fixed sequence of whole-batch tensor operations: the pairs are the slots with
  ``nn[nn[x]] == x`` (``x < nn[x]`` keeps the pair, ``x > nn[x]`` is absorbed), heights, parents
  and rounds are recorded with masks, and one ``nonzero`` (the only host synchronisation a
  round needs) lists the ``P`` kept slots, whose rows are rebuilt from their partners' rows
  (``P x N`` work), written to rows and, by symmetry, columns.
* Nearest neighbours are then refreshed in one of two ways (``neighbours``):
  ``"dense"``: one ``min`` over the whole matrix, no synchronisation (accelerators);
  ``"touched"``: only rows that can have changed -- the new clusters, rows whose neighbour was
  merged, rows a new cluster ties or undercuts -- listed by a second ``nonzero`` (CPU: ``S x N``
  work instead of ``N x N``; the pairs' rows are gathered into one buffer kept across rounds,
  since fresh pages cost more than the copy; columns are written from the transposed new rows,
  row by row).
  Rows whose neighbour survives keep it exactly: by reducibility their distance to a union is
  at least their old nearest distance.
* The linkages are monotone, so the ``k``-cluster cut consists of the ``N - k`` lowest merges,
  and no future merge is lower than the smallest nearest distance: a sample stops (its slots
  become inactive) once ``N - k`` recorded merges lie at or below it; the loop ends when no
  sample merges. (Merges after that point could not enter the cut anyway.)
* The cut: merge ``j`` into ``i`` (``i < j``) records ``parent[j] = i``; keeping the ``N - k``
  lowest merges (height, then round) and following parents (pointer jumping) labels every token
  with the smallest token of its cluster.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NEIGHBOUR_REFRESH = ("dense", "touched")
ROUND_RANGE = "sdmerge.cluster.round"  # profiler range around each merge round
GROUP_TOKENS = 8192  # "dense": samples clustered together hold at most this many tokens in all
_BLOCK_PAIRS = 256  # "touched": pairs per block of same-round distances (whole samples)
_CHUNK_ELEMENTS = 1 << 18  # "touched": distances per chunk of rows refreshed at a time
_INF = math.inf


@torch.no_grad()
def rnn_labels(distances: Tensor, k: int, linkage: str, neighbours: str) -> tuple[Tensor, int]:
    """Labels ``[B, N]`` (0..k-1, numbered by first token) and the number of merge rounds.

    ``distances: [B, N, N]`` symmetric, consumed (overwritten); ``linkage`` one of single,
    complete, average; ``neighbours`` one of :data:`NEIGHBOUR_REFRESH`. Each round (and the
    final check that finds no pair) runs inside a ``torch.profiler.record_function`` range
    named :data:`ROUND_RANGE`, so profiles can tell the rounds from the fixed work of a call.
    ``"dense"`` clusters large batches in groups of samples (:data:`GROUP_TOKENS`); the rounds
    returned are then those of all groups.
    """
    B, N, _ = distances.shape
    group = max(1, GROUP_TOKENS // N) if neighbours == "dense" else B
    if B > group:  # bounds the [P, P] blocks of same-round distances (P pairs of all the group)
        parts = [rnn_labels(distances[start : start + group], k, linkage, neighbours) for start in range(0, B, group)]
        return torch.cat([labels for labels, _ in parts]), sum(rounds for _, rounds in parts)
    state = _RNNClustering(distances, linkage, neighbours)
    need = state.N - k
    while need > 0:
        with torch.profiler.record_function(ROUND_RANGE):
            if not state.merge_round(need):
                break
    return state.cut(need), state.rounds


class _RNNClustering:
    """State of the batched clustering: ``D [B, N, N]``, per slot ``[B, N]``: nearest neighbour
    ``nn`` and its distance, cluster size, ``active``; per absorbed slot: merge height, round and
    parent. Samples that are done (enough low merges) are made inactive."""

    def __init__(self, distances: Tensor, linkage: str, neighbours: str):
        B, N, _ = distances.shape
        self.D, self.linkage, self.neighbours, self.B, self.N = distances, linkage, neighbours, B, N
        device, dtype = distances.device, distances.dtype
        self.diagonal = distances.diagonal(dim1=-2, dim2=-1)
        self.diagonal.fill_(_INF)
        self.rows = distances.view(B * N, N)
        self.columns = distances.transpose(1, 2)  # columns[b, i] is column i of sample b
        self.positions = torch.arange(N, device=device)
        self.active = torch.ones(B, N, dtype=torch.bool, device=device)
        self.size = torch.ones(B * N, dtype=dtype, device=device)  # flat: slot b * N + i
        # Nearest neighbours in [B, N, 1] buffers (``min(keepdim=True, out=...)`` is one operation).
        self.nn_dist3 = torch.empty(B, N, 1, dtype=dtype, device=device)
        self.nn3 = torch.empty(B, N, 1, dtype=torch.int64, device=device)
        torch.min(distances, dim=-1, keepdim=True, out=(self.nn_dist3, self.nn3))
        self.nn_dist, self.nn = self.nn_dist3.view(B, N), self.nn3.view(B, N)
        self.height = torch.full((B, N), _INF, dtype=dtype, device=device)  # indexed by the absorbed slot
        self.round = torch.zeros(B, N, dtype=torch.int64, device=device)
        self.parent = self.positions.expand(B, N).clone()
        self.inf = torch.full((), _INF, dtype=dtype, device=device)
        self.one = torch.ones((), dtype=torch.int64, device=device)
        self.zero = torch.zeros((), dtype=torch.int64, device=device)
        self.low_merges = torch.empty(B, N, dtype=torch.int64, device=device)
        # "touched": scratch kept across rounds (the pairs' rows; the unions' rows transposed)
        self.scratch = [torch.empty(0, dtype=dtype, device=device) for _ in range(2)]
        self.rounds = 0

    def merge_round(self, need: int) -> bool:
        """One round: merge every reciprocal pair of the active samples; False if there was none."""
        kept, absorbed = self._pairs(self.rounds + 1)
        flat_i = kept.view(-1).nonzero().view(-1)  # host synchronisation: the number of pairs
        if flat_i.numel() == 0:
            return False
        self.rounds += 1
        self._merge(flat_i, kept, absorbed)
        # Done: ``need`` merges at or below the smallest nearest distance (no later merge is lower).
        lowest = self.nn_dist.amin(dim=-1, keepdim=True)
        torch.where(self.height <= lowest, self.one, self.zero, out=self.low_merges)
        self.active.mul_(self.low_merges.sum(dim=-1, keepdim=True) < need)  # bool product: logical and
        return True

    def _pairs(self, step: int) -> tuple[Tensor, Tensor]:
        """Reciprocal pairs: kept slots ``i < nn[i]`` and absorbed slots ``j > nn[j]`` (``[B, N]``
        masks); records the height, parent and round of each absorbed slot. (Products of bool
        tensors are logical ands, one operation each.)"""
        nn = self.nn
        mutual = (nn.gather(1, nn) == self.positions) * self.active
        kept = mutual * (self.positions < nn)
        # ``nn[x] == x`` only for the last cluster of a sample, which is done (inactive) by then.
        absorbed = mutual > kept
        torch.where(absorbed, self.nn_dist, self.height, out=self.height)
        torch.where(absorbed, nn, self.parent, out=self.parent)
        self.round.masked_fill_(absorbed, step)
        return kept, absorbed

    def _merge(self, flat_i: Tensor, kept: Tensor, absorbed: Tensor) -> None:
        """Merge the pairs of the kept slots ``flat_i = b * N + i`` with ``j = nn[b, i]``: rows and
        columns ``i`` become the unions; then refresh the nearest neighbours. (``new`` below, the
        unions' rows, ends exact at every active column but the union's own, reset with the
        diagonal.)"""
        N, P = self.N, flat_i.numel()
        b, i = flat_i.div(N, rounding_mode="floor"), flat_i.remainder(N)
        j = self.nn.take(flat_i)
        flat_j = flat_i - i + j
        flat_ij, ij = torch.cat((flat_i, flat_j)), torch.cat((i, j))
        sizes = total = None
        if self.linkage == "average":
            sizes = self.size.take(flat_ij).view(2, P, 1)
            total = sizes.sum(dim=0)  # [P, 1]
            self.size.index_copy_(0, flat_i, total.view(P))
        self.active ^= absorbed  # absorbed slots are active: exclusive or clears them
        if self.neighbours == "dense":
            pair_rows = self.rows[flat_ij]  # [2P, N]: rows i, then rows j
            stacked = pair_rows.view(2, P, N)
            new = _lance_williams(stacked, 0, self.linkage, sizes, total, out=stacked[0])
            _same_round_distances_(new, i, j, b, sizes, total, self.linkage)
            self._write_dense(b, ij, flat_ij, flat_j, pair_rows, stacked[1])
        else:  # one gather into a buffer kept across rounds (fresh pages are slow), in place
            stacked = torch.index_select(self.rows, 0, flat_ij, out=self._scratch(0, 2 * P, N)).view(2, P, N)
            new = stacked[0]
            if self.linkage == "average":  # scipy's numbers, as _lance_williams computes them
                new.mul_(sizes[0]).add_(stacked[1].mul_(sizes[1])).div_(total)
            else:
                _lance_williams(stacked, 0, self.linkage, out=new)
            counts = kept.sum(dim=-1).tolist()
            for start, stop in _sample_groups(counts):  # whole samples, so that each block stays small
                _same_round_distances_(
                    new[start:stop], i[start:stop], j[start:stop], b[start:stop],
                    None if sizes is None else sizes[:, start:stop], None if total is None else total[start:stop],
                    self.linkage,
                )
            self._refresh_touched(self._write_touched(counts, i, flat_i, new), kept, absorbed)

    def _write_dense(
        self, b: Tensor, ij: Tensor, flat_ij: Tensor, flat_j: Tensor, pair_rows: Tensor, gone: Tensor
    ) -> None:
        """Few operations: rows i and j (+inf), then columns i and j (which overwrite the rows'
        stale entries at columns j), then rows j again (columns i wrote stale entries there),
        the diagonal; nearest neighbours by one ``min`` over the whole matrix."""
        gone.fill_(_INF)
        self.rows.index_copy_(0, flat_ij, pair_rows)
        self.columns.index_put_((torch.cat((b, b)), ij), pair_rows)
        self.rows.index_fill_(0, flat_j, _INF)
        self.diagonal.fill_(_INF)
        torch.min(self.D, dim=-1, keepdim=True, out=(self.nn_dist3, self.nn3))

    def _scratch(self, which: int, rows: int, columns: int) -> Tensor:
        """A contiguous ``[rows, columns]`` tensor in scratch buffer ``which``, grown when needed."""
        if self.scratch[which].numel() < rows * columns:
            self.scratch[which] = torch.empty(rows * columns, dtype=self.D.dtype, device=self.D.device)
        return self.scratch[which][: rows * columns].view(rows, columns)

    def _write_touched(self, counts: list[int], i: Tensor, flat_i: Tensor, new: Tensor) -> Tensor:
        """Little memory traffic: rows i; then, sample by sample (``counts`` pairs each), columns i
        from the transposed rows (each matrix row is written at a few columns, not each column
        down all rows). Absorbed columns are left as they are (refreshed rows are masked by the
        active slots) and rows j are never read again. Returns, per slot ``[B, N]``, the smallest
        distance to a union of its sample (entries of inactive slots and of the unions
        themselves are stale, but those slots are inactive or refreshed anyway)."""
        N = self.N
        self.rows.index_copy_(0, flat_i, new)
        undercut = torch.full((self.B, N), _INF, dtype=new.dtype, device=new.device)
        start = 0
        for sample, count in enumerate(counts):
            if count == 0:
                continue
            stop = start + count
            by_row = self._scratch(1, N, count).copy_(new[start:stop].t())
            self.D[sample].scatter_(1, i[start:stop].view(1, count).expand(N, count), by_row)
            torch.amin(by_row, dim=1, out=undercut[sample])
            start = stop
        self.diagonal.fill_(_INF)
        return undercut

    def _refresh_touched(self, undercut: Tensor, kept: Tensor, absorbed: Tensor) -> None:
        """Nearest neighbours of only the rows whose neighbour can have changed: the unions, rows
        whose neighbour was merged, rows a union ties or undercuts; over active columns only."""
        stale = (kept | absorbed).gather(1, self.nn) | (undercut <= self.nn_dist) | kept
        stale &= self.active
        self.nn_dist.masked_fill_(absorbed, _INF)
        flat = stale.view(-1).nonzero().view(-1)  # host synchronisation: the rows to refresh
        samples = flat.div(self.N, rounding_mode="floor")
        inactive = ~self.active
        chunk = max(1, _CHUNK_ELEMENTS // self.N)  # rows gathered at a time stay in the CPU's caches
        for start in range(0, flat.numel(), chunk):
            rows = flat[start : start + chunk]
            distances = self.rows.index_select(0, rows)
            distances.masked_fill_(inactive.index_select(0, samples[start : start + chunk]), _INF)
            value, index = distances.min(dim=-1)
            self.nn_dist.view(-1).index_copy_(0, rows, value)
            self.nn.view(-1).index_copy_(0, rows, index)

    def cut(self, need: int) -> Tensor:
        """Labels ``[B, N]`` after the ``need`` lowest merges (by height, then round)."""
        B, N = self.B, self.N
        by_round = torch.sort(self.round, dim=-1, stable=True).indices
        by_height = torch.sort(self.height.gather(1, by_round), dim=-1, stable=True).indices
        order = by_round.gather(1, by_height)
        rank = torch.empty_like(order).scatter_(1, order, self.positions.expand(B, N).contiguous())
        pointer = torch.where(rank < need, self.parent, self.positions)
        for _ in range(max(1, math.ceil(math.log2(N)))):
            pointer = pointer.gather(1, pointer)
        first_token = torch.where(pointer == self.positions, self.one, self.zero)
        return (first_token.cumsum(dim=-1) - 1).gather(1, pointer)


def _same_round_distances_(
    new: Tensor, i: Tensor, j: Tensor, b: Tensor, sizes: Tensor | None, total: Tensor | None, linkage: str
) -> None:
    """Write into the unions' rows ``new [P, N]`` their distances to the other unions of the same
    sample and round: ``d(p, q)`` by Lance-Williams over ``p``'s new row at columns ``i_q, j_q``
    (as scipy computes it when ``p`` merges first), taken from the pair with the smaller slot
    for both ``(p, q)`` and ``(q, p)``, so the matrix stays exactly symmetric.

    ``i, j, b: [P]`` the pairs (sorted by sample), ``sizes [2, P, 1]`` and ``total [P, 1]`` their
    clusters' sizes (average linkage). Works on a ``[P, P]`` block: pairs of other samples (and
    ``p`` itself) write onto ``p``'s own column ``i_p``, a diagonal entry reset afterwards.
    """
    P = new.shape[0]
    cross = new.index_select(1, torch.cat((i, j))).view(P, 2, P)
    i_column, i_row = i.view(P, 1), i.view(1, P)
    if linkage == "average":
        block = _lance_williams(cross, 1, linkage, sizes.reshape(1, 2, P), total.view(1, P))
        block = torch.where(i_column < i_row, block, block.transpose(0, 1))
    else:  # min and max are symmetric already
        block = _lance_williams(cross, 1, linkage)
    same_sample = b.view(P, 1) == b.view(1, P)
    new.scatter_(1, torch.where(same_sample, i_row, i_column), block)


def _sample_groups(pairs_per_sample: list[int]) -> list[tuple[int, int]]:
    """Ranges of consecutive pairs covering whole samples, about :data:`_BLOCK_PAIRS` pairs each."""
    groups, start, stop = [], 0, 0
    for count in pairs_per_sample:
        if stop > start and stop - start + count > _BLOCK_PAIRS:
            groups.append((start, stop))
            start = stop
        stop += count
    if stop > start:
        groups.append((start, stop))
    return groups


def _lance_williams(
    stacked: Tensor, dim: int, linkage: str, sizes: Tensor | None = None, total: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Distances to the unions of clusters ``a`` and ``b`` (ATC eq. 1-3).

    ``stacked`` holds ``d(x, a)`` and ``d(x, b)`` along ``dim`` (size 2); average linkage also
    needs the clusters' ``sizes`` along the same dim and their sum ``total`` (broadcastable to
    the result), and evaluates scipy's ``(n_a d_xa + n_b d_xb) / (n_a + n_b)`` (a sum of two
    terms is their plain sum, exactly). ``out`` may be a view into ``stacked``.
    """
    if linkage == "average":
        return torch.div((stacked * sizes).sum(dim=dim), total, out=out)
    union = stacked.amax(dim=dim) if linkage == "complete" else stacked.amin(dim=dim)
    return union if out is None else out.copy_(union)  # a reduction must not write into its input
