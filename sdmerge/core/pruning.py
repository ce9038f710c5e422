"""Pruning baselines as plans ("Which tokens to use?", Haurum et al. 2023, section 3.1.2).

- Top-K: keep the most attended free tokens, drop the rest.
- EViT: keep the most attended free tokens and fuse all the others into one token, averaged
  with their attention as weights (``plan.merge(x, weights=importance)``). The fused token
  counts toward the kept tokens, so Top-K, EViT and the merging methods leave the same
  number of tokens for the same removal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .crucial import check_removal, top_free_tokens
from .plan import MergePlan, plan_from_representatives


def top_k_pruning(importance: Tensor, remove: int, protected: int = 0, sizes: Tensor | None = None) -> MergePlan:
    """Drop the ``remove`` least important free tokens. ``importance``: ``[B, N]``."""
    B, N = importance.shape
    check_removal(remove, N, protected, "top-k pruning")
    if remove == 0:
        return MergePlan.identity(B, N, sizes=sizes, device=importance.device)
    representative = torch.arange(N, device=importance.device).expand(B, N).contiguous()
    _, rest = top_free_tokens(importance, N - protected - remove, protected)
    representative.scatter_(1, rest, -1)
    return plan_from_representatives(representative, N - remove, sizes, drops=True)


def evit_fusion(importance: Tensor, remove: int, protected: int = 0, sizes: Tensor | None = None) -> MergePlan:
    """Keep ``N - protected - remove - 1`` free tokens, fuse the other ``remove + 1`` into one."""
    B, N = importance.shape
    check_removal(remove, N, protected, "EViT", kept_at_least=1)
    if remove == 0:
        return MergePlan.identity(B, N, sizes=sizes, device=importance.device)
    representative = torch.arange(N, device=importance.device).expand(B, N).contiguous()
    _, rest = top_free_tokens(importance, N - protected - remove - 1, protected)
    representative.scatter_(1, rest, rest[:, :1].expand_as(rest))  # the first fused token represents the rest
    return plan_from_representatives(representative, N - remove, sizes)
