"""The attention processors sdmerge wraps around the ones a merged block had."""

from __future__ import annotations

from diffusers.models.attention_processor import Attention
from torch import Tensor

from .merged_block import MergedBlock


class TokenMergingProcessor:
    """``attn1`` processor: merge the tokens, run the original processor on them, unmerge.

    ``__call__(attn, hidden_states [B, N, C], **kwargs) -> [B, N, C]``. Everything but
    ``hidden_states`` goes to the original processor unchanged. (diffusers' ``Attention`` passes
    a processor only the ``cross_attention_kwargs`` its ``__call__`` names; this one names none,
    so such extra arguments for a custom ``attn1`` processor are dropped, and diffusers warns.)
    """

    def __init__(self, original, block: MergedBlock):
        self.original = original
        self.block = block

    def __call__(self, attn: Attention, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        merge = self.block.merge_plan(attn, hidden_states)
        if merge is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{self.block.name}.attn1 got a self-attention mask, which merged tokens cannot use")
        plan, weights = merge
        return plan.unmerge(self.original(attn, plan.merge(hidden_states, weights), *args, **kwargs))
