"""Token importance: the class importance score of ToMeCIS (Seol et al., eq. 7-8), two ways.

With one head both are ``A_i * ||V_i||_2``; with several they differ in where the head mean is taken:

- :func:`importance_score`, the paper's text: ``S_i = mean_h(A_{h,i} * ||V_{h,i}||_2)``;
- :func:`head_mean_importance_score`, the ToMeCIS code (which produced its published numbers):
  ``S_i = mean_h(A_{h,i}) * ||mean_h(V_{h,i})||_2``.
"""

from __future__ import annotations

from torch import Tensor


def importance_score(attention: Tensor, values: Tensor) -> Tensor:
    """``S_i = mean_h(A_{h,i} * ||V_{h,i}||_2)``: ToMeCIS eq. 8, averaged over heads.

    Args:
        attention: ``[B, H, N]`` attention each token receives, e.g. the class token's row of the
            attention probabilities (``A_cls``, eq. 7).
        values: ``[B, H, N, Dh]`` value vectors per head.

    Returns ``[B, N]`` float32 scores (computed in float32, so float16 inputs do not underflow
    in the product; merging guards against scores that are exactly zero).
    """
    _check_shapes(attention, values)
    return (attention.float() * values.float().norm(dim=-1)).mean(dim=1)


def head_mean_importance_score(attention: Tensor, values: Tensor) -> Tensor:
    """``S_i = mean_h(A_{h,i}) * ||mean_h(V_{h,i})||_2``: ToMeCIS eq. 8 as its code computes it.

    Shapes and dtype as :func:`importance_score`: ``[B, H, N]`` and ``[B, H, N, Dh]`` -> ``[B, N]`` float32.
    """
    _check_shapes(attention, values)
    return attention.float().mean(dim=1) * values.float().mean(dim=1).norm(dim=-1)


def _check_shapes(attention: Tensor, values: Tensor) -> None:
    if attention.shape != values.shape[:3]:
        raise ValueError(
            f"attention [B, H, N] = {tuple(attention.shape)} does not match values [B, H, N, Dh] = {tuple(values.shape)}"
        )
