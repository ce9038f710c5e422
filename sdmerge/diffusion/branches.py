"""The hooks around a merged block's branches: merge the input tokens, run, unmerge the output.

Each branch chosen by ``merge_attn`` / ``merge_crossattn`` / ``merge_mlp`` runs on the block's
merged tokens and is unmerged after it (tomesd's ``m_a``, ``m_c``, ``m_m`` and ``u_a``, ``u_c``,
``u_m``):

    y = unmerge(branch(merge(h)))        h: [B, N, C] -> merge -> [B, M, C] -> branch -> unmerge -> [B, N, C]

The self-attention makes the block's plan (:meth:`MergedBlock.plan`) whichever branches merge
(a single-stream block whose body runs merged: its norm, which runs first); the later branches
use it. With ``kv_only``
the self-attention instead keeps all ``N`` queries and takes its keys and values from the ``M``
merged tokens, each weighted by the number of tokens it stands for (proportional attention, ToMe
eq. 1):

    attn(h) = softmax(q(h) k(merge(h))^T / sqrt(d) + log(sizes)) v(merge(h))      [B, N, C]

so a group of ``s`` identical tokens gets exactly the attention its ``s`` tokens would get
(``prop_attn=True`` adds the same bias when the queries are merged too).

Only image tokens are merged. Where a module receives the prompt's tokens first and the image
tokens after them in one sequence (a single-stream block, ``Branch.text_first``), only the last
``N`` tokens are merged and unmerged. A single-stream block's body (attention and MLP on one
normed sequence, one output projection) can also run merged as a whole (:class:`SpanStart`,
:class:`SpanEnd`), every token keeping its own residual. A cache (a diffusers hook: pyramid
attention broadcast, TaylorSeer) keeps a module's output and replays it (or extrapolates from it)
in later calls, whose plans group other tokens, so what leaves a cached module must be every
token. Where a cache wraps the attention (as those two do), the attention unmerges its output
inside the cache's hook and :class:`MergedBodyReentry` merges it again outside it (an unmerge
and a merge of width ``C``). Where one wraps the norm or the MLP, the body does not run merged: each of
attention, MLP and output projection merges its input and unmerges its output instead, as the
branches of other blocks do (same result, merges and unmerges of the MLP's width ``4C`` and of
the output projection's input ``5C``).

The hooks wrap the branch modules' forward (:mod:`sdmerge.diffusion.forward_hooks`), not their
attention processors: whatever processor a layer has (set before or after ``apply``: attention
slicing, fused projections, IP-Adapter, LoRA) runs unchanged, on merged tokens. Each hook reads
the current call of its thread (:class:`~sdmerge.diffusion.call.CurrentCall`); without one (a
module called outside a call of the patched model) the branch runs unmerged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import proportional_attention_bias
from ..core.plan import MergePlan
from .call import CallState, CurrentCall
from .config import MergeConfig
from .forward_hooks import has_diffusers_hooks
from .layout import AttentionTokens, Branch
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


def _split(sequence: Tensor, count: int, text_first: bool) -> tuple[Tensor | None, Tensor]:
    """``(prompt tokens or None, the last count image tokens)`` of a ``[B, S, C]`` sequence."""
    if not text_first:
        return None, sequence
    return sequence[:, : sequence.shape[1] - count], sequence[:, sequence.shape[1] - count :]


def _joined(prefix: Tensor | None, image: Tensor) -> Tensor:
    return image if prefix is None else torch.cat([prefix, image], dim=1)


def _unmerged(plan: MergePlan, sequence: Tensor, text_first: bool) -> Tensor:
    """``sequence`` ``[B, (T +) M, C]`` with its last ``M`` (image) tokens unmerged to ``N``."""
    prefix, image = _split(sequence, plan.num_groups, text_first)
    return _joined(prefix, plan.unmerge(image))


def _replaced(output, index: int | None, value):
    """``output`` with ``value`` in place of its element ``index`` (``None``: of itself)."""
    if index is None:
        return value
    return (*output[:index], value, *output[index + 1 :])


def _unmerged_output(branch: Branch, plan: MergePlan, output):
    """``output`` with its image tokens ``[B, M, C]`` unmerged to ``[B, N, C]``."""
    part = output if branch.output is None else output[branch.output]
    return _replaced(output, branch.output, _unmerged(plan, part, branch.text_first))


class SelfAttentionBranch:
    """Around a merged block's self-attention: make the block's plan; run the attention on merged
    tokens and unmerge its output (``merge_attn``), or give it merged keys and values
    (``kv_only``), or leave it unchanged (``merge_attn=False``: only later branches merge).

    The module runs as it is where it can (merged tokens as its input; diffusers' self-attention:
    merged keys and values as ``encoder_hidden_states``, ``log(sizes)`` as ``attention_mask``), else
    through the layout's :attr:`~.layout.Branch.merged_attention`. In a single-stream block whose
    body runs merged in this call (:class:`SpanStart`) its input is merged already."""

    def __init__(self, block: MergedBlock, config: MergeConfig, current: CurrentCall):
        self.block, self.config, self.current = block, config, current
        self.branch = block.site.attention

    def around(self, module, forward, args: tuple, kwargs: dict):
        call = self.current.get()
        if call is None:
            self.block.outside_a_call()
            return forward(*args, **kwargs)
        branch, config = self.branch, self.config
        sequence = branch.tokens.get(args, kwargs)
        text = None if branch.text is None else branch.text.get(args, kwargs)
        if self.block.name in call.merged_bodies:
            merge = call.plans[self.block.name]
            prefix, merged = _split(sequence, merge[0].num_groups, branch.text_first)
            output = branch.merged_attention(module, args, kwargs, self._tokens(call, merge, merged, merged, prefix, True))
            # a cache around the attention keeps every token; MergedBodyReentry merges them again outside it
            return _unmerged_output(branch, merge[0], output) if has_diffusers_hooks(module) else output
        prefix, image = _split(sequence, call.counts[self.block.name], branch.text_first)
        merge = self.block.plan(call, module, image, text if text is not None else prefix)
        if merge is None or not config.merge_attn:
            return forward(*args, **kwargs)
        if kwargs.get("attention_mask") is not None:
            raise ValueError(f"{branch.name} got a self-attention mask, which merged tokens cannot use")
        plan, weights = merge
        merged = plan.merge(image, weights)
        queries = image if config.kv_only else merged
        tokens = self._tokens(call, merge, queries, merged, text if text is not None else prefix, not config.kv_only)
        if branch.merged_attention is not None and (config.kv_only or tokens.bias is not None or not branch.stock_merged):
            output = branch.merged_attention(module, args, kwargs, tokens)
        elif config.kv_only:
            if getattr(module, "fused_projections", False):
                raise ValueError(
                    f"kv_only cannot merge {branch.name} with fused QKV projections (fuse_qkv_projections): its keys "
                    "and values need a projection of their own; call unfuse_qkv_projections() first"
                )
            return forward(*args, **{**kwargs, **merged_keys_and_values(plan, weights, image)})
        else:
            args, kwargs = branch.tokens.replace(args, kwargs, _joined(prefix, merged))
            if tokens.bias is not None:  # prop_attn through diffusers' additive mask [B, 1, M]
                kwargs = {**kwargs, "attention_mask": tokens.bias[:, 0]}
            output = forward(*args, **kwargs)
        return output if config.kv_only else _unmerged_output(branch, plan, output)

    def _tokens(self, call, merge, queries: Tensor, keys: Tensor, text: Tensor | None, queries_merged: bool):
        """The :class:`~.layout.AttentionTokens` of this call: ``log(sizes)`` on the merged keys
        with ``kv_only`` or ``prop_attn`` (none for groups known to be equal: a constant cancels)."""
        plan, weights = merge
        proportional = (self.config.kv_only or self.config.prop_attn) and not plan.equal_groups
        bias = proportional_attention_bias(plan.merged_sizes, keys.dtype) if proportional else None
        return AttentionTokens(queries, keys, text, bias, plan, weights, queries_merged, call)


class LaterBranch:
    """Around a branch after the self-attention (``merge_crossattn``: the cross-attention or
    second self-attention; ``merge_mlp``: the feed-forward; a single-stream block's output
    projection): merge its tokens with the block's plan, unmerge its output; unchanged when the
    block merges nothing in this call, or its body runs merged (its input is merged already). The
    prompt is never merged. Where the self-attention did not run (a cache replayed its output),
    the plan is made here (:meth:`MergedBlock.plan_without_attention`)."""

    def __init__(self, block: MergedBlock, branch: Branch, option: str, current: CurrentCall):
        self.block, self.branch, self.option, self.current = block, branch, option, current

    def around(self, module, forward, args: tuple, kwargs: dict):
        call = self.current.get()
        if call is None or self.block.name in call.merged_bodies:
            return forward(*args, **kwargs)
        merge = call.plans[self.block.name] if self.block.name in call.plans else self.block.plan_without_attention(call)
        if merge is None:
            return forward(*args, **kwargs)
        plan, weights = merge
        prefix, image = _split(self.branch.tokens.get(args, kwargs), plan.num_tokens, self.branch.text_first)
        if image.shape[:2] != plan.labels.shape:
            raise ValueError(
                f"{self.option}: {self.branch.name} got {image.shape[1]} tokens, not the block's {plan.num_tokens} "
                "(a chunked feed-forward, enable_forward_chunking?); merging it needs the whole token sequence: call "
                "disable_forward_chunking() on the model"
            )
        args, kwargs = self.branch.tokens.replace(args, kwargs, _joined(prefix, plan.merge(image, weights)))
        return _unmerged_output(self.branch, plan, forward(*args, **kwargs))


class SpanStart:
    """Around the module that opens a single-stream block's body (its norm, which runs before the
    attention and the MLP) where the body runs merged: make the block's plan from the image part
    of its output and merge that part, so that the body runs on ``T + M`` tokens, unless a
    diffusers hook would see the body's merged tokens (module docstring). There the attention, or
    a later branch where a cache replays the attention, makes the plan when it needs one."""

    def __init__(self, block: MergedBlock, current: CurrentCall):
        self.block, self.current = block, current
        self.span = block.site.span
        self.body = (self.span.start, block.site.mlp.module)  # the attention: MergedBodyReentry

    def around(self, module, forward, args: tuple, kwargs: dict):
        output = forward(*args, **kwargs)
        call = self.current.get()
        if call is None or any(has_diffusers_hooks(part) for part in self.body):
            return output
        sequence = output if self.span.start_output is None else output[self.span.start_output]
        prefix, image = _split(sequence, call.counts[self.block.name], True)
        merge = self.block.plan(call, self.block.site.attention.module, image, prefix)
        if merge is None:
            return output
        call.merged_bodies.add(self.block.name)
        plan, weights = merge
        return _replaced(output, self.span.start_output, _joined(prefix, plan.merge(image, weights)))


class MergedBodyReentry:
    """Outside every wrapper of a single-stream block's attention (an
    :class:`~.forward_hooks.OutsideHook`): where the body runs merged in this call and a diffusers
    hook (a cache) wraps the attention, the attention hands every token out, ``[B, T + N, C]``, for
    the cache to keep and to replay in later calls, whose plans group other tokens; merge its image
    part here with this call's plan, so that the body goes on with ``[B, T + M, C]``."""

    def __init__(self, block: MergedBlock, current: CurrentCall):
        self.block, self.current = block, current
        self.branch = block.site.attention

    def after(self, module, output):
        call = self.current.get()
        if call is None or self.block.name not in call.merged_bodies or not has_diffusers_hooks(module):
            return output
        plan, weights = call.plans[self.block.name]
        part = output if self.branch.output is None else output[self.branch.output]
        prefix, image = _split(part, plan.num_tokens, self.branch.text_first)
        return _replaced(output, self.branch.output, _joined(prefix, plan.merge(image, weights)))


class SpanEnd(LaterBranch):
    """Around the output projection that closes a single-stream block's body: where the body ran
    merged, unmerge the image part of its output, before the block's gate and residual; otherwise
    merge its input and unmerge its output (:class:`LaterBranch`)."""

    def __init__(self, block: MergedBlock, current: CurrentCall):
        super().__init__(block, block.site.span.end, "merge_mlp", current)

    def around(self, module, forward, args: tuple, kwargs: dict):
        call: CallState | None = self.current.get()
        if call is None or self.block.name not in call.merged_bodies:
            return super().around(module, forward, args, kwargs)
        return _unmerged(call.plans[self.block.name][0], forward(*args, **kwargs), True)
