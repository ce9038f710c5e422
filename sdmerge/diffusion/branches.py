"""The hooks around a merged block's branches: merge the input tokens, run, unmerge the output.

Each branch chosen by ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` runs on the block's
merged tokens and is unmerged after it (tomesd's ``m_a``, ``m_c``, ``m_m`` and ``u_a``, ``u_c``,
``u_m``):

    y = unmerge(branch(merge(h)))        h: [B, N, C] -> merge -> [B, M, C] -> branch -> unmerge -> [B, N, C]

The self-attention's pre-hook makes the block's plan (:meth:`MergedBlock.plan`) whichever
branches merge; the later branches use it. With ``kv_only`` the self-attention instead keeps all
``N`` queries and takes its keys and values from the ``M`` merged tokens, each weighted by the
number of tokens it stands for (proportional attention, ToMe eq. 1):

    attn(h) = softmax(q(h) k(merge(h))^T / sqrt(d) + log(sizes)) v(merge(h))      [B, N, C]

so a group of ``s`` identical tokens gets exactly the attention its ``s`` tokens would get.

The hooks wrap the branch modules' forward (:mod:`sdmerge.diffusion.forward_hooks`), not their
attention processors: whatever processor a layer has (set before or after ``apply``: attention
slicing, fused projections, IP-Adapter, LoRA) runs unchanged, on merged tokens. Each hook reads
the current call of its thread (:class:`~sdmerge.diffusion.call.CurrentCall`); without one (a
module called outside a call of the patched model) the branch runs unmerged.
"""

from __future__ import annotations

from torch import Tensor

from ..core import proportional_attention_bias
from ..core.plan import MergePlan
from .call import CurrentCall
from .config import MergeConfig
from .layout import Branch
from .merged_block import MergedBlock


def merged_keys_and_values(plan: MergePlan, weights: Tensor | None, hidden_states: Tensor) -> dict[str, Tensor]:
    """The keyword arguments that make a diffusers self-attention take its keys and values from
    the merged tokens: ``encoder_hidden_states`` ``[B, M, C]`` and the proportional attention bias
    ``log(sizes)`` as ``attention_mask`` ``[B, 1, M]`` (diffusers' additive mask, repeated over
    heads and queries by ``Attention.prepare_attention_mask``). A plan whose groups are known to
    be equal (``MergePlan.equal_groups``) gets no mask: a constant bias cancels in the softmax,
    and a mask costs the attention kernel time."""
    merged = {"encoder_hidden_states": plan.merge(hidden_states, weights)}
    if not plan.equal_groups:
        merged["attention_mask"] = proportional_attention_bias(plan.merged_sizes, hidden_states.dtype)[:, 0]
    return merged


def _unmerged_output(branch: Branch, plan: MergePlan, output):
    """``output`` with its image tokens ``[B, M, C]`` unmerged to ``[B, N, C]``."""
    if branch.output is None:
        return plan.unmerge(output)
    return (*output[: branch.output], plan.unmerge(output[branch.output]), *output[branch.output + 1 :])


class SelfAttentionBranch:
    """Around a merged block's self-attention: make the block's plan; run the attention on merged
    tokens and unmerge its output (``merge_attn``), or give it merged keys and values
    (``kv_only``: the layout's :attr:`~.layout.Branch.keys_values`, or diffusers' self-attention
    taking them as ``encoder_hidden_states``), or leave it unchanged (``merge_attn=False``: only
    later branches merge)."""

    def __init__(self, block: MergedBlock, config: MergeConfig, current: CurrentCall):
        self.block, self.config, self.current = block, config, current
        self.branch = block.site.attention

    def around(self, module, forward, args: tuple, kwargs: dict):
        call = self.current.get()
        if call is None:
            self.block.outside_a_call()
            return forward(*args, **kwargs)
        merge = self.block.plan(call, module, args, kwargs)
        if merge is None or not self.config.merge_attn:
            return forward(*args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{self.branch.name} got a self-attention mask, which merged tokens cannot use")
        plan, weights = merge
        tokens = self.branch.tokens.get(args, kwargs)
        if not self.config.kv_only:
            args, kwargs = self.branch.tokens.replace(args, kwargs, plan.merge(tokens, weights))
            return _unmerged_output(self.branch, plan, forward(*args, **kwargs))
        if self.branch.keys_values is not None:
            bias = None if plan.equal_groups else proportional_attention_bias(plan.merged_sizes, tokens.dtype)
            return self.branch.keys_values(module, args, kwargs, plan.merge(tokens, weights), bias)
        if getattr(module, "fused_projections", False):
            raise ValueError(
                f"kv_only cannot merge {self.branch.name} with fused QKV projections (fuse_qkv_projections): its keys "
                "and values need a projection of their own; call unfuse_qkv_projections() first"
            )
        return forward(*args, **{**kwargs, **merged_keys_and_values(plan, weights, tokens)})


class LaterBranch:
    """Around a branch after the self-attention (``merge_crossattn``: the cross-attention or
    second self-attention; ``merge_mlp``: the feed-forward): merge its tokens with the block's
    plan, unmerge its output; unchanged when the block merges nothing in this call. The prompt is
    never merged."""

    def __init__(self, block: MergedBlock, branch: Branch, option: str, current: CurrentCall):
        self.block, self.branch, self.option, self.current = block, branch, option, current

    def around(self, module, forward, args: tuple, kwargs: dict):
        call = self.current.get()
        merge = None if call is None else call.plans.get(self.block.name)
        if merge is None:
            return forward(*args, **kwargs)
        plan, weights = merge
        tokens = self.branch.tokens.get(args, kwargs)
        if tokens.shape[:2] != plan.labels.shape:
            raise ValueError(
                f"{self.option}: {self.branch.name} got {tokens.shape[1]} tokens, not the block's {plan.num_tokens} "
                "(a chunked feed-forward, enable_forward_chunking?); merging it needs the whole token sequence: call "
                "disable_forward_chunking() on the model"
            )
        args, kwargs = self.branch.tokens.replace(args, kwargs, plan.merge(tokens, weights))
        return _unmerged_output(self.branch, plan, forward(*args, **kwargs))
