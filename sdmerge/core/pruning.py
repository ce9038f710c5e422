"""Pruning baselines as plans ("Which tokens to use?", Haurum et al. 2023, section 3.1.2).

- Top-K: keep the ``K`` most attended free tokens, drop the rest.
- EViT (Liang et al. 2022): keep the ``K`` most attended free tokens and fuse all the others
  into one extra token (``K + 1`` free tokens remain). As EViT's code and the TokenReduction
  code behind the "Which tokens to use?" tables compute it, the fused token is
  ``sum_i a_i x_i`` over the pruned tokens ``i``, ``a_i`` their class-token attention (a softmax
  row over all tokens, so the weights do not sum to 1); the paper's sentence ("averaging ...
  weighted by their CLS token attention") divides by ``sum_i a_i`` (:func:`evit_merge`).
  The fused token is an ordinary token afterwards: later stages keep or fuse it by its
  attention like any other.
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


def evit_fusion(importance: Tensor, prune: int, protected: int = 0, sizes: Tensor | None = None) -> MergePlan:
    """EViT's grouping: keep the ``N - protected - prune`` most important free tokens, fuse the
    other ``prune`` into one token.

    Args:
        importance: ``[B, N]``, the head-averaged class-token attention ``a``.
        prune: tokens fused, ``1 <= prune <= N - protected - 1`` (at least one token is kept
            besides the fused one, as EViT's code asserts).

    Returns a plan of ``N - prune + 1`` groups: the protected tokens, the kept tokens in their
    relative order, then the fused token, always the last group (EViT's code appends it).
    Merge with :func:`evit_merge`.
    """
    B, N = importance.shape
    check_removal(prune, N, protected, "EViT")
    if prune < 1:
        raise ValueError(f"EViT fuses at least 1 token, asked to prune {prune}; a block that prunes none is skipped")
    keep = N - protected - prune
    kept, _ = top_free_tokens(importance, keep, protected)
    labels = torch.full((B, N), protected + keep, dtype=torch.int64, device=importance.device)  # the fused token
    labels[:, :protected] = torch.arange(protected, device=importance.device)
    labels.scatter_(1, kept, torch.arange(protected, protected + keep, device=importance.device).expand(B, keep))
    return MergePlan(labels, protected + keep + 1, sizes)


def evit_merge(plan: MergePlan, x: Tensor, attention: Tensor, average: bool = False) -> Tensor:
    """The tokens after EViT's fusion: ``x: [B, N, C] -> [B, M, C]`` for a plan of :func:`evit_fusion`.

    Kept tokens are unchanged. The fused token (the last) is ``sum_i a_i x_i`` over the pruned
    tokens (EViT's code), or with ``average=True`` ``sum_i a_i x_i / sum_i a_i`` (the paper's
    weighted average); ``attention``: ``a``, ``[B, N]``.
    """
    fused = plan.labels == plan.num_groups - 1
    weights = torch.where(fused, attention.float(), torch.ones((), device=attention.device))
    return plan.merge(x, weights, normalise=average)
