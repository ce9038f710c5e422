"""Crucial-token merging (MSTM, Bian et al., eq. 4).

The ``N - protected - remove`` most important free tokens are *crucial* and stay; every other
free token joins its most similar crucial token (cosine similarity of the metric). With
importance weights, the merged token is
``m_j = (w_j i_j + sum_{k in S_j} w_k u_k) / (w_j + sum_{k in S_j} w_k)`` (eq. 4), which is
``plan.merge(x, weights=importance)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .plan import MergePlan, plan_from_representatives
from .similarity import most_similar


def top_free_tokens(importance: Tensor, keep: int, protected: int) -> tuple[Tensor, Tensor]:
    """Split the free tokens ``protected..N-1`` by importance (``[B, N]``).

    Returns ``(kept, rest)``: ``[B, keep]`` and ``[B, N - protected - keep]`` token indices,
    each sorted by position.
    """
    order = importance[:, protected:].argsort(dim=-1, descending=True) + protected
    return order[:, :keep].sort(dim=-1).values, order[:, keep:].sort(dim=-1).values


def check_removal(remove: int, num_tokens: int, protected: int, method: str, kept_at_least: int = 1) -> None:
    limit = max(num_tokens - protected - kept_at_least, 0)
    if not 0 <= remove <= limit:
        raise ValueError(
            f"{method} can remove at most {limit} of {num_tokens} tokens ({protected} protected, "
            f"at least {kept_at_least} kept), asked to remove {remove}"
        )


def crucial_token_merging(
    metric: Tensor, importance: Tensor, remove: int, protected: int = 0, sizes: Tensor | None = None
) -> MergePlan:
    """Keep the most important tokens, merge every other one into its most similar kept token.

    Args:
        metric: ``[B, N, D]`` similarity features.
        importance: ``[B, N]`` scores (e.g. :func:`sdmerge.core.importance.importance_score`).
        remove: tokens to remove, ``0 <= remove <= N - protected - 1``.
        protected: prefix tokens that are neither merged nor merged into.

    Returns a plan with ``N - remove`` groups.
    """
    B, N, _ = metric.shape
    check_removal(remove, N, protected, "crucial-token merging")
    representative = torch.arange(N, device=metric.device).expand(B, N).contiguous()
    if remove > 0:
        with torch.no_grad():
            crucial, rest = top_free_tokens(importance, N - protected - remove, protected)
            _, choice = most_similar(metric, rest, crucial)
            representative.scatter_(1, rest, crucial.gather(1, choice))
    return plan_from_representatives(representative, N - remove, sizes)
