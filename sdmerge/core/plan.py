"""The merge plan: the result of a grouping, and the only way tokens are merged or unmerged.

A plan partitions the N tokens of every sample into the same number M of groups. A token may
also be *dropped* (pruning baselines): its label is then M and it belongs to no group.

    plan = some_grouping(metric, remove=...)      # any grouping in sdmerge.core
    y = plan.merge(x)                              # [B, N, C] -> [B, M, C], weighted group means
    x_back = plan.unmerge(y)                       # [B, M, C] -> [B, N, C], each token gets its group's row
    plan.merged_sizes                              # [B, M], original tokens held by each group

Plans compose (``first.then(second)``), which is how ViT blocks carry sizes and provenance
(which original tokens each merged token holds) from block to block.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

# Added to every merge weight (in float32) so that a group whose weights are all zero, or have
# underflowed in float16, falls back to its plain mean instead of 0/0. Any weight above ~1e-23
# is unchanged by it in float32.
_WEIGHT_FLOOR = 1e-30


def check_keep_rate(keep_rate: float) -> float:
    """Return ``keep_rate`` as a float, or raise ``ValueError`` unless it is a real number
    (int, float, numpy scalar; not bool, not str) with ``0 < keep_rate <= 1``."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise ValueError(
            f"keep rate r={keep_rate!r} ({type(keep_rate).__name__}) is not a number; allowed: a real number "
            "0 < r <= 1 (int or float; a bool or str is not taken as one)"
        )
    value = float(keep_rate)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"keep rate r={keep_rate!r} is outside the allowed range 0 < r <= 1")
    return value


def tokens_to_remove(num_tokens: int, keep_rate: float) -> int:
    """Tokens removed when keeping the fraction ``keep_rate`` of ``num_tokens``: floor(N * (1 - r)).

    The floor is taken with a 1e-6 tolerance, so r=0.9 of 1000 tokens removes 100 (plain float
    arithmetic gives 99.99999999999997). ``keep_rate=1`` removes nothing.
    """
    keep_rate = check_keep_rate(keep_rate)
    return int(math.floor(num_tokens * (1.0 - keep_rate) + 1e-6))


def batch_rows(index: Tensor, rows_per_sample: int) -> Tensor:
    """Rows of a batch flattened: ``index: [B, n]``, rows of each sample's ``[K, C]`` (``K =
    rows_per_sample``) -> ``[B*n]``, the same rows of ``[B*K, C]``, for one ``index_select`` or
    ``index_add_`` over the whole batch."""
    if index.shape[0] == 1:
        return index.reshape(-1)
    offsets = torch.arange(0, index.shape[0] * rows_per_sample, rows_per_sample, device=index.device)
    return (index + offsets.unsqueeze(1)).reshape(-1)


class MergePlan:
    """A grouping of ``N`` tokens into ``M`` groups per sample.

    Args:
        labels: ``[B, N]`` int64, the group of every token, in ``[0, M]``; ``M`` marks a dropped token.
        num_groups: ``M``, the same for every sample; every label in ``[0, M)`` must be used.
        sizes: ``[B, N]``, how many original tokens each input token already stands for
            (``None``: every token is one original token).
        equal_groups: the grouping knows that every group holds the same number of tokens and
            ``sizes`` is ``None`` (the grid grouping when every group is a whole window), so that
            proportional attention, a constant bias then, may be left out.
    """

    def __init__(
        self,
        labels: Tensor,
        num_groups: int,
        sizes: Tensor | None = None,
        *,
        drops: bool = False,
        equal_groups: bool = False,
    ):
        if labels.dim() != 2 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor of shape [B, N], got {labels.dtype} {tuple(labels.shape)}")
        if sizes is not None and sizes.shape != labels.shape:
            raise ValueError(f"sizes must have the labels' shape {tuple(labels.shape)}, got {tuple(sizes.shape)}")
        if num_groups < 1:
            raise ValueError(f"a plan needs at least one group, got num_groups={num_groups}")
        self.labels = labels
        self.num_groups = int(num_groups)
        self.sizes = sizes
        self.drops = drops  # True when some labels equal num_groups (pruned tokens)
        self.equal_groups = equal_groups and sizes is None
        # [B*N]: every token's row in the merged tokens flattened to [B*(M+drops), C]. Merging and
        # unmerging move whole rows (index_add_ / index_select), not elements through an index
        # expanded to [B, N, C]: 2-4x less time on the CPU for wide tokens, one launch either way.
        self.rows = batch_rows(labels, self._slots)

    @property
    def _slots(self) -> int:
        """Rows of a sample's merged tokens: ``M``, and one more for the dropped tokens if any."""
        return self.num_groups + self.drops

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.labels.shape[1]

    def _group_sum(self, values: Tensor) -> Tensor:
        """Sum ``values: [B, N]`` (float) over each group -> ``[B, M]``."""
        B = self.batch_size
        out = values.new_zeros(B, self._slots)
        out.scatter_add_(1, self.labels, values)
        return out[:, : self.num_groups] if self.drops else out

    @property
    def counts(self) -> Tensor:
        """``[B, M]`` float32: number of input tokens in each group."""
        return self._group_sum(torch.ones(self.labels.shape, dtype=torch.float32, device=self.labels.device))

    @property
    def merged_sizes(self) -> Tensor:
        """``[B, M]``: original tokens held by each group (the sum of its tokens' sizes)."""
        if self.sizes is None:
            return self.counts
        return self._group_sum(self.sizes)

    def merge(self, x: Tensor, weights: Tensor | None = None, *, normalise: bool = True) -> Tensor:
        """Weighted mean of each group: ``[B, N, C] -> [B, M, C]``.

        ``y_g = sum_{i in g} w_i x_i / sum_{i in g} w_i`` with ``w`` = ``weights`` if given, else the
        plan's sizes (ToMe's size-weighted average), else uniform (plain mean, as tomesd).
        Weights are normalised per group in float32 (safe for float16 scores that are zero or
        underflow); the sum itself runs in ``x.dtype``. ``normalise=False`` (``weights`` required):
        the weighted sum ``y_g = sum_{i in g} w_i x_i`` instead (EViT's fused token).
        """
        if x.shape[:2] != self.labels.shape:
            raise ValueError(f"x must be [B, N, C] with [B, N] = {tuple(self.labels.shape)}, got {tuple(x.shape)}")
        if not normalise and weights is None:
            raise ValueError("normalise=False sums the tokens with their weights; pass weights [B, N]")
        if weights is None:
            weights = self.sizes
        if weights is None:
            return self._sum_rows(x) * self.counts.reciprocal().to(x.dtype).unsqueeze(-1)
        if weights.shape != self.labels.shape:
            raise ValueError(f"weights must be [B, N] = {tuple(self.labels.shape)}, got {tuple(weights.shape)}")
        if normalise:
            w = weights.float() + _WEIGHT_FLOOR
            total = w.new_zeros(self.batch_size, self._slots).scatter_add_(1, self.labels, w)
            coefficients = (w / total.gather(1, self.labels)).to(x.dtype)
        else:
            coefficients = weights.to(x.dtype)
        return self._sum_rows(x * coefficients.unsqueeze(-1))

    def _sum_rows(self, x: Tensor) -> Tensor:
        """Sum the tokens of each group: ``[B, N, C] -> [B, M, C]`` (dropped tokens left out)."""
        B, N, C = x.shape
        out = x.new_zeros(B * self._slots, C).index_add_(0, self.rows, x.reshape(B * N, C)).view(B, self._slots, C)
        return out[:, : self.num_groups] if self.drops else out

    def unmerge(self, y: Tensor) -> Tensor:
        """Give every token its group's row: ``[B, M, C] -> [B, N, C]`` (dropped tokens get zeros)."""
        B, M, C = y.shape
        if B != self.batch_size or M != self.num_groups:
            raise ValueError(f"y must be [B, M, C] with B={self.batch_size}, M={self.num_groups}, got {tuple(y.shape)}")
        if self.drops:
            y = torch.cat([y, y.new_zeros(B, 1, C)], dim=1)
        return y.reshape(-1, C).index_select(0, self.rows).view(B, self.num_tokens, C)

    def then(self, second: "MergePlan") -> "MergePlan":
        """The plan of merging with ``self`` and then with ``second`` (whose N is this plan's M).

        The result maps the original tokens straight to ``second``'s groups, so its labels are
        the provenance of every merged token, and its ``merged_sizes`` equal ``second``'s.
        """
        if second.num_tokens != self.num_groups or second.batch_size != self.batch_size:
            raise ValueError(
                f"cannot compose: the second plan takes {second.num_tokens} tokens of batch {second.batch_size}, "
                f"the first yields {self.num_groups} of batch {self.batch_size}"
            )
        labels = second.labels
        if self.drops:  # a token dropped by the first plan stays dropped
            labels = torch.cat([labels, labels.new_full((self.batch_size, 1), second.num_groups)], dim=1)
        return MergePlan(
            labels.gather(1, self.labels), second.num_groups, self.sizes, drops=self.drops or second.drops
        )

    @classmethod
    def identity(cls, batch_size: int, num_tokens: int, *, sizes: Tensor | None = None, device=None) -> "MergePlan":
        """The plan that keeps every token as its own group."""
        labels = torch.arange(num_tokens, device=device).expand(batch_size, num_tokens).contiguous()
        return cls(labels, num_tokens, sizes)


def plan_from_representatives(
    representative: Tensor,
    num_groups: int,
    sizes: Tensor | None = None,
    *,
    drops: bool = False,
    order: Tensor | None = None,
) -> MergePlan:
    """Build a plan from each token's representative.

    Args:
        representative: ``[B, N]`` int64; token ``i`` joins the group of token ``representative[b, i]``,
            which must be its own representative; ``-1`` drops the token.
        num_groups: the number of representatives in every sample (known to every grouping,
            so no device synchronisation is needed to count them).
        drops: whether any token is dropped (``-1``); only pruning groupings set it.
        order: ``[N]`` or ``[B, N]``, a permutation of the token positions: groups are numbered
            in the order their representatives appear in it. ``None``: by the representative's
            position, so protected prefix tokens (their own representatives) keep positions
            ``0..p-1`` and the order of the other groups follows the token order.
    """
    B, N = representative.shape
    positions = torch.arange(N, device=representative.device)
    is_representative = representative == positions
    if order is None:
        rank = is_representative.cumsum(dim=1) - 1
    else:
        order = order.expand(B, N)
        rank = torch.empty_like(representative).scatter_(1, order, is_representative.gather(1, order).cumsum(dim=1) - 1)
    if not drops:
        return MergePlan(rank.gather(1, representative), num_groups, sizes)
    labels = rank.gather(1, representative.clamp_min(0)).masked_fill(representative < 0, num_groups)
    return MergePlan(labels, num_groups, sizes, drops=True)
