"""Proportional attention (ToMe): a token that stands for ``s`` original tokens counts ``s`` times."""

from __future__ import annotations

import torch
from torch import Tensor


def proportional_attention_bias(sizes: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Additive attention-logit bias ``log(s_j)`` for every key ``j``: ``[B, M] -> [B, 1, 1, M]``.

    ``softmax(q k^T / sqrt(d) + log s)`` weights key ``j`` as if it appeared ``s_j`` times. Pass
    the result as a float ``attn_mask`` (SDPA) or add it to the logits before the softmax.
    """
    bias = sizes.float().log()[:, None, None, :]
    return bias if dtype is None else bias.to(dtype)
