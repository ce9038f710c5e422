"""What sdmerge wraps around a merged block's branches: its attention processors and its feed-forward.

Each branch (``attn1``, ``attn2``, ``ff``) chosen by ``merge_attn`` / ``merge_crossattn`` /
``merge_mlp`` runs on the block's merged tokens and is unmerged after it (tomesd's ``m_a``,
``m_c``, ``m_m`` and ``u_a``, ``u_c``, ``u_m``):

    y = unmerge(branch(merge(h)))        h: [B, N, C] -> merge -> [B, M, C] -> branch -> unmerge -> [B, N, C]

``attn1``'s processor computes the block's plan (:meth:`MergedBlock.merge_plan`) whichever
branches merge; the later branches use it. With ``kv_only`` the self-attention instead keeps all
``N`` queries and takes its keys and values from the ``M`` merged tokens, each weighted by the
number of tokens it stands for (proportional attention, ToMe eq. 1):

    attn1(h) = softmax(q(h) k(merge(h))^T / sqrt(d) + log(sizes)) v(merge(h))      [B, N, C]

so a group of ``s`` identical tokens gets exactly the attention its ``s`` tokens would get.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention
from torch import Tensor

from ..core import proportional_attention_bias
from ..core.plan import MergePlan
from .merged_block import MergedBlock


def _merged(run, plan: MergePlan, weights: Tensor | None, hidden_states: Tensor) -> Tensor:
    """``unmerge(run(merge(hidden_states)))``: ``[B, N, C] -> [B, N, C]``."""
    return plan.unmerge(run(plan.merge(hidden_states, weights)))


def merged_keys_and_values(plan: MergePlan, weights: Tensor | None, hidden_states: Tensor) -> dict[str, Tensor]:
    """The keyword arguments that make a diffusers self-attention processor take its keys and
    values from the merged tokens: ``encoder_hidden_states`` ``[B, M, C]`` and the proportional
    attention bias ``log(sizes)`` as ``attention_mask`` ``[B, 1, M]`` (diffusers' additive mask,
    repeated over heads and queries by ``Attention.prepare_attention_mask``). A plan whose groups
    are known to be equal (``MergePlan.equal_groups``) gets no mask: a constant bias cancels in
    the softmax, and a mask costs the attention kernel time."""
    merged = {"encoder_hidden_states": plan.merge(hidden_states, weights)}
    if not plan.equal_groups:
        merged["attention_mask"] = proportional_attention_bias(plan.merged_sizes, hidden_states.dtype)[:, 0]
    return merged


class TokenMergingProcessor:
    """``attn1`` processor: compute the block's plan; merge the tokens, run the original processor
    on them, unmerge (``merge_attn``), or merge only the keys and values (``kv_only``), or pass the
    tokens through unchanged (``merge_attn=False``: only later branches merge).

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
        config = self.block.state.config
        if merge is None or not config.merge_attn:
            return self.original(attn, hidden_states, *args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{self.block.name}.attn1 got a self-attention mask, which merged tokens cannot use")
        plan, weights = merge
        if not config.kv_only:
            return _merged(lambda merged: self.original(attn, merged, *args, **kwargs), plan, weights, hidden_states)
        if getattr(attn, "fused_projections", False):
            raise ValueError(
                f"kv_only cannot merge {self.block.name}.attn1 with fused QKV projections (fuse_qkv_projections): "
                "its keys and values need a projection of their own; call unfuse_qkv_projections() first"
            )
        kwargs.update(merged_keys_and_values(plan, weights, hidden_states))
        return self.original(attn, hidden_states, *args, **kwargs)


class CrossAttentionMergingProcessor:
    """``attn2`` processor (``merge_crossattn``): run the original processor on the block's merged
    tokens and unmerge, ``[B, N, C] -> [B, N, C]``; unchanged when the block merges nothing in this
    call. The prompt (``encoder_hidden_states``) is not merged."""

    def __init__(self, original, block: MergedBlock):
        self.original = original
        self.block = block

    def __call__(self, attn: Attention, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        if self.block.current is None:
            return self.original(attn, hidden_states, *args, **kwargs)
        plan, weights = self.block.current
        return _merged(lambda merged: self.original(attn, merged, *args, **kwargs), plan, weights, hidden_states)


class FeedForwardMerging:
    """Forward hooks on a block's ``ff`` (``merge_mlp``): :meth:`before` merges its input,
    :meth:`after` unmerges its output, with the block's plan; nothing when the block merges
    nothing in this call."""

    def __init__(self, block: MergedBlock):
        self.block = block

    def before(self, module, args, kwargs):
        if self.block.current is None:
            return None
        plan, weights = self.block.current
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        if hidden_states.shape[:2] != plan.labels.shape:
            raise ValueError(
                f"merge_mlp: {self.block.name}.ff got {hidden_states.shape[1]} tokens, not the block's "
                f"{plan.num_tokens} (a chunked feed-forward, enable_forward_chunking?); merge_mlp needs the whole "
                "token sequence: call unet.disable_forward_chunking()"
            )
        return (plan.merge(hidden_states, weights), *args[1:]), kwargs

    def after(self, module, args, kwargs, output: Tensor):
        if self.block.current is None:
            return None
        return self.block.current[0].unmerge(output)
