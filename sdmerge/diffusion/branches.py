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

The hooks are forward hooks on the branch modules (``register_forward_pre_hook`` /
``register_forward_hook`` with keyword arguments), not attention processors: whatever processor a
layer has (set before or after ``apply``: attention slicing, fused projections, IP-Adapter, LoRA)
runs unchanged, on merged tokens. Each hook reads the current call of its thread
(:class:`~sdmerge.diffusion.call.CurrentCall`); without one (a module called outside a call of
the patched model) the branch runs unmerged.
"""

from __future__ import annotations

from torch import Tensor

from ..core import proportional_attention_bias
from ..core.plan import MergePlan
from .call import CurrentCall, Merge
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


class SelfAttentionHooks:
    """Pre- and forward hook of a merged block's self-attention: make the block's plan; merge its
    tokens and unmerge its output (``merge_attn``), or give it merged keys and values
    (``kv_only``), or leave it unchanged (``merge_attn=False``: only later branches merge)."""

    def __init__(self, block: MergedBlock, config: MergeConfig, current: CurrentCall):
        self.block, self.config, self.current = block, config, current
        self.branch = block.site.attention

    def _merged(self) -> Merge | None:
        call = self.current.get()
        return None if call is None else call.plans.get(self.block.name)

    def before(self, module, args, kwargs):
        call = self.current.get()
        if call is None:
            self.block.outside_a_call()
            return None
        tokens = self.branch.tokens.get(args, kwargs)
        merge = self.block.plan(call, module, tokens)
        if merge is None or not self.config.merge_attn:
            return None
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{self.branch.name} got a self-attention mask, which merged tokens cannot use")
        plan, weights = merge
        if not self.config.kv_only:
            return self.branch.tokens.replace(args, kwargs, plan.merge(tokens, weights))
        if getattr(module, "fused_projections", False):
            raise ValueError(
                f"kv_only cannot merge {self.branch.name} with fused QKV projections (fuse_qkv_projections): its keys "
                "and values need a projection of their own; call unfuse_qkv_projections() first"
            )
        return args, {**kwargs, **merged_keys_and_values(plan, weights, tokens)}

    def after(self, module, args, kwargs, output):
        merge = self._merged()
        if merge is None or not self.config.merge_attn or self.config.kv_only:
            return None
        return _unmerged_output(self.branch, merge[0], output)


class LaterBranchHooks:
    """Pre- and forward hook of a branch after the self-attention (``merge_crossattn``:
    ``attn2``; ``merge_mlp``: ``ff``): merge its tokens with the block's plan, unmerge its output;
    unchanged when the block merges nothing in this call. The prompt is never merged."""

    def __init__(self, block: MergedBlock, branch: Branch, option: str, current: CurrentCall):
        self.block, self.branch, self.option, self.current = block, branch, option, current

    def _merged(self) -> Merge | None:
        call = self.current.get()
        return None if call is None else call.plans.get(self.block.name)

    def before(self, module, args, kwargs):
        merge = self._merged()
        if merge is None:
            return None
        plan, weights = merge
        tokens = self.branch.tokens.get(args, kwargs)
        if tokens.shape[:2] != plan.labels.shape:
            raise ValueError(
                f"{self.option}: {self.branch.name} got {tokens.shape[1]} tokens, not the block's {plan.num_tokens} "
                "(a chunked feed-forward, enable_forward_chunking?); merging it needs the whole token sequence: call "
                "disable_forward_chunking() on the model"
            )
        return self.branch.tokens.replace(args, kwargs, plan.merge(tokens, weights))

    def after(self, module, args, kwargs, output):
        merge = self._merged()
        return None if merge is None else _unmerged_output(self.branch, merge[0], output)
