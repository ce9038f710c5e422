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
  neighbours again (their columns and rows become +inf). Nearest neighbours are
  exact (smallest distance, then smallest index: ``torch.min``'s first minimum), so the
  nearest-neighbour graph has no cycle longer than two and every round with two or more
  clusters left finds a pair.
* A round is one fixed sequence of whole-batch tensor operations: the pairs are the slots with
  ``nn[nn[x]] == x`` (``x < nn[x]`` keeps the pair, ``x > nn[x]`` is absorbed), heights, parents
  and rounds are recorded with masks, and one ``nonzero`` (the only host synchronisation a
  round needs) lists the ``P`` kept slots, whose rows are rebuilt from their partners' rows
  (``P x N`` work), written to rows and, by symmetry, columns. Nearest neighbours are then
  refreshed by one ``min`` over the whole matrix, with no synchronisation.
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

ROUND_RANGE = "sdmerge.cluster.round"  # profiler range around each merge round
GROUP_TOKENS = 8192  # samples clustered together hold at most this many tokens in all
_INF = math.inf


@torch.no_grad()
def rnn_labels(distances: Tensor, k: int, linkage: str) -> tuple[Tensor, int]:
    """Labels ``[B, N]`` (0..k-1, numbered by first token) and the number of merge rounds.

    ``distances: [B, N, N]`` symmetric, consumed (overwritten); ``linkage`` one of single,
    complete, average. Each round (and the final check that finds no pair) runs inside a
    ``torch.profiler.record_function`` range named :data:`ROUND_RANGE`, so profiles can tell the
    rounds from the fixed work of a call. Large batches are clustered in groups of samples
    (:data:`GROUP_TOKENS`); the rounds returned are then those of all groups.
    """
    B, N, _ = distances.shape
    group = max(1, GROUP_TOKENS // N)
    if B > group:  # bounds the [P, P] blocks of same-round distances (P pairs of all the group)
        parts = [rnn_labels(distances[start : start + group], k, linkage) for start in range(0, B, group)]
        return torch.cat([labels for labels, _ in parts]), sum(rounds for _, rounds in parts)
    state = _RNNClustering(distances, linkage)
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

    def __init__(self, distances: Tensor, linkage: str):
        B, N, _ = distances.shape
        self.D, self.linkage, self.B, self.N = distances, linkage, B, N
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
        self.one = torch.ones((), dtype=torch.int64, device=device)
        self.zero = torch.zeros((), dtype=torch.int64, device=device)
        self.low_merges = torch.empty(B, N, dtype=torch.int64, device=device)
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
        pair_rows = self.rows[flat_ij]  # [2P, N]: rows i, then rows j
        stacked = pair_rows.view(2, P, N)
        new = _lance_williams(stacked, 0, self.linkage, sizes, total, out=stacked[0])
        _same_round_distances_(new, i, j, b, sizes, total, self.linkage)
        self._write(b, ij, flat_ij, flat_j, pair_rows, stacked[1])

    def _write(
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
