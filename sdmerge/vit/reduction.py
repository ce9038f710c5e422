"""Token reduction inside a ViT block, shared by every ViT integration.

A ViT integration patches each block so that, after the attention residual and before the
MLP (ToMe; ATC section 3), the tokens are reduced:

    x = x + attention(norm1(x), bias=state.attention_bias(dtype))   # records keys (+ A_cls, V)
    x = state.reduce(block, x)                                       # [B, N, C] -> [B, N - r_l, C]
    x = x + mlp(norm2(x))

This module holds everything that does not depend on the model library:

* :class:`ReductionConfig`: method, schedule, protected prefix, proportional attention;
* :class:`ReductionState`: what one forward call carries from block to block (token sizes,
  provenance of every token) and the attention outputs the reducing block records;
* :func:`class_token_attention`: the class-token attention row ``A_cls`` (ToMeCIS eq. 7);
* :func:`class_importance`: the importance each method uses (ToMeCIS eq. 8, code or paper reading, or ``A_cls``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core import (
    MergePlan,
    alternating_split,
    evit_merge,
    head_mean_importance_score,
    importance_score,
    proportional_attention_bias,
)
from ..methods import Method, get_method
from .schedule import TokenSchedule, check_schedule, make_schedule

if TYPE_CHECKING:
    from .options import ReductionOptions


def class_token_attention(query: Tensor, key: Tensor, scaling: float, bias: Tensor | None = None) -> Tensor:
    """``A_cls = softmax(q_cls k^T * scaling + bias)``: the class token's attention row (ToMeCIS eq. 7).

    Args:
        query, key: ``[B, H, N, Dh]``; the class token is token 0.
        bias: the additive logit bias of the block's attention (proportional attention:
            ``[B, 1, 1, N]``), or ``None``.

    Returns ``[B, H, N]`` float32, equal to row 0 of the block's attention probabilities up to
    round-off. Only this row is computed (``N`` logits per head, not ``N^2``), so the block's
    own attention can stay fused.
    """
    logits = torch.matmul(query[:, :, :1], key.transpose(-1, -2)) * scaling  # [B, H, 1, N]
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1, dtype=torch.float32)[:, :, 0]


CIS_SCORES = ("code", "paper")
"""The two readings of ToMeCIS eq. 8 over several heads (``cis_score``; see :func:`class_importance`)."""

EVIT_FUSIONS = ("code", "paper")
"""EViT's fused token (``evit_fusion``): ``"code"``, ``sum_i a_i x_i`` (EViT's code and the code behind
"Which tokens to use?"), or ``"paper"``, that sum divided by ``sum_i a_i`` (:func:`sdmerge.core.evit_merge`)."""


def method_formula(option: str, value: str | None, default: str, owner: str, method: Method) -> str:
    """The value of a formula option that only method ``owner`` has (``cis_score``, ``evit_fusion``;
    its value is checked by its declaration, :mod:`sdmerge.vit.options`): ``default`` when ``None``;
    ``ValueError`` for the option given with another method."""
    if value is None:
        return default
    if method.name != owner:
        raise ValueError(f"{option}={value!r} applies to method {owner!r} only, not {method.name!r}")
    return value


def class_importance(method: Method, class_attention: Tensor, values: Tensor, cis_score: str = "code") -> Tensor:
    """Per-token importance ``[B, N]`` (float32) from the class-token attention row.

    Args:
        class_attention: ``A_cls``, ``[B, H, N]``: the attention the class token pays to every
            token (ToMeCIS eq. 7), from the block's own attention pass.
        values: ``[B, H, N, Dh]`` value vectors of the same pass.
        cis_score: for ``cis``, ``"code"``: ``S = mean_h(A_cls) * ||mean_h(V)||_2`` (the ToMeCIS
            code, which produced the published numbers); ``"paper"``: ``S = mean_h(A_cls * ||V||_2)``
            (the paper's sentence: "averaging S_cls of all heads").

    ``crucial``, ``topk``, ``evit``: ``A_cls`` averaged over heads (MSTM section 3, "Which
    tokens to use?" section 3.1.2, EViT).
    """
    if method.name == "cis":
        score = head_mean_importance_score if cis_score == "code" else importance_score
        return score(class_attention, values)
    return class_attention.float().mean(dim=1)


@dataclass(frozen=True)
class ReductionConfig:
    """What an integration fixes at apply time.

    Args:
        method: the merging method (:func:`sdmerge.methods.get_method` with ``"vit"``).
        schedule: removals per block.
        protected: prefix tokens never merged (class token; DeiT's distillation token).
        prop_attn: add ``log(size)`` to the attention logits of every block after a reduction
            (merged tokens only: see :attr:`proportional_attention`).
        cis_score: the CIS formula of ``cis`` (:data:`CIS_SCORES`, :func:`class_importance`).
        evit_fusion: EViT's fused token (:data:`EVIT_FUSIONS`).
    """

    method: Method
    schedule: TokenSchedule
    protected: int
    prop_attn: bool = True
    cis_score: str = "code"
    evit_fusion: str = "code"
    _removals: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_options(
        cls, method: str, depth: int, num_tokens: int, protected: int, r, options: "ReductionOptions"
    ) -> "ReductionConfig":
        """Build the config of ``sdmerge.apply(model, method, r, **options)`` for a ``depth``-block
        model with ``num_tokens`` input tokens (``protected`` of them prefix tokens).

        Raises ``ValueError`` for an unknown method, an invalid or ambiguous schedule
        (:func:`~sdmerge.vit.schedule.make_schedule`), one the method cannot follow at ``num_tokens``,
        or a ``cis_score`` / ``evit_fusion`` given with another method than ``cis`` / ``evit``.
        """
        chosen = get_method(method, "vit")
        cis_score = method_formula("cis_score", options.cis_score, CIS_SCORES[0], "cis", chosen)
        evit_fusion = method_formula("evit_fusion", options.evit_fusion, EVIT_FUSIONS[0], "evit", chosen)
        token_schedule = make_schedule(
            depth, r, stages=options.stages, tokens_per_block=options.tokens_per_block, schedule=options.schedule
        )
        config = cls(chosen, token_schedule, protected, options.prop_attn, cis_score, evit_fusion)
        config.removals(num_tokens)  # validate now, not at the first call
        return config

    @property
    def proportional_attention(self) -> bool:
        """Whether proportional attention acts: ``prop_attn`` and a merging method. Merged tokens
        (``tome``, ``atc_*``, and ``cis``/``crucial``, whose sizes still count their tokens, as the
        ToMeCIS code does) have sizes; the pruning methods' tokens all keep size 1 (EViT's fused
        token is an ordinary token, as in EViT's code), so there is no bias to add."""
        return self.prop_attn and not self.method.prunes

    def removals(self, num_tokens: int) -> tuple[int, ...]:
        """The checked removals per block for ``num_tokens`` input tokens (cached per count)."""
        if num_tokens not in self._removals:
            self._removals[num_tokens] = check_schedule(self.schedule, self.method, num_tokens, self.protected)
        return self._removals[num_tokens]


class ReductionState:
    """One forward call's reduction state; a new one is made for every call.

    Attributes:
        removals: tokens each block takes out of the kept set (merged away or pruned; EViT then
            adds its fused token) for this call's token count.
        sizes: ``[B, N_l]`` float32, the size of every current token in proportional attention
            and size-weighted pooling (``None`` until the first reduction: every token is one
            token). Merging methods: the original tokens it stands for. ``topk`` and ``evit``:
            1 for every token, EViT's fused token included (it is an ordinary token).
        provenance: a :class:`~sdmerge.core.MergePlan` from the ``N_0`` input tokens to the
            current tokens (``labels [B, N_0]``, pruned tokens: label ``N_l``; ``None`` until the
            first reduction): the input tokens every current token holds, EViT's fused token
            holding every token fused into it, transitively. Its ``merged_sizes`` count them; they
            equal ``sizes`` for the merging methods.
    """

    def __init__(self, config: ReductionConfig, num_tokens: int):
        self.config = config
        self.removals = config.removals(num_tokens)
        self.sizes: Tensor | None = None
        self.provenance: MergePlan | None = None
        self._recorded: dict[str, Tensor] = {}

    def is_plain(self, block: int) -> bool:
        """Whether ``block`` runs exactly as unpatched: no reduction so far and none in it."""
        return self.sizes is None and self.removals[block] == 0

    def reduces(self, block: int) -> bool:
        return self.removals[block] > 0

    def attention_bias(self, dtype: torch.dtype) -> Tensor | None:
        """``[B, 1, 1, N_l]`` = ``log(sizes)`` for proportional attention, or ``None``
        (:attr:`ReductionConfig.proportional_attention`)."""
        if not self.config.proportional_attention or self.sizes is None:
            return None
        return proportional_attention_bias(self.sizes, dtype)

    def record_attention(self, block: int, query: Tensor, key: Tensor, value: Tensor, scaling: float, bias) -> None:
        """Keep what :meth:`reduce` needs from the attention ``block`` just computed, if it reduces.

        ``query``/``key``/``value``: ``[B, H, N, Dh]``; ``scaling`` and ``bias`` (:meth:`attention_bias`)
        as the block's attention used them. Kept: the keys and values, and for the methods that
        need it the class token's attention row (:func:`class_token_attention`, same logits and bias).
        """
        if not self.reduces(block):
            return
        self._recorded = {"keys": key, "values": value}
        if self.config.method.needs_importance:
            self._recorded["class_attention"] = class_token_attention(query, key, scaling, bias)

    def reduce(self, block: int, x: Tensor) -> Tensor:
        """Reduce ``x: [B, N, C]`` to ``[B, N - removals[block] (+ 1 for EViT's fused token), C]``
        with the recorded attention.

        Metric: keys averaged over heads (ToMe), ``[B, N, Dh]``. Merged tokens are averaged with the method's
        weights (sizes, or importance for ``cis``/``crucial``); EViT's fused token is
        :func:`~sdmerge.core.evit_merge` of the pruned tokens. Sizes add up (pruning methods: every
        token keeps size 1) and the provenance plan is composed with this block's plan.

        Token order after the reduction: bipartite methods (``tome``, ``cis``) follow ToMe's ViT
        implementation, protected tokens, then the unmerged sources (even positions), then all
        destinations (odd positions), each in ascending current position, so the next block's
        alternating split runs over that order; the other methods keep the tokens' relative order
        (EViT's fused token last).
        """
        method, protected = self.config.method, self.config.protected
        recorded, self._recorded = self._recorded, {}
        if "keys" not in recorded:
            raise RuntimeError(f"block {block} reduces tokens but its attention recorded no keys")
        keys = recorded["keys"]
        if keys.shape[2] != x.shape[1]:
            raise RuntimeError(f"block {block}: keys of {keys.shape[2]} tokens for {x.shape[1]} hidden tokens")
        importance = None
        if method.needs_importance:
            importance = class_importance(method, recorded["class_attention"], recorded["values"], self.config.cis_score)
        split = alternating_split(x.shape[1], protected, device=x.device) if method.needs_split else None
        metric = keys.mean(dim=1).detach()  # grouping is a discrete choice: no gradient through it
        plan = method.plan(
            metric, self.removals[block], protected=protected, sizes=self.sizes, importance=importance, split=split,
            split_order=method.needs_split,
        )
        if method.fused_tokens:
            x = evit_merge(plan, x, importance, average=self.config.evit_fusion == "paper")
        else:
            x = plan.merge(x, weights=method.weights(self.sizes, importance))
        self.sizes = x.new_ones(x.shape[:2], dtype=torch.float32) if method.prunes else plan.merged_sizes
        self.provenance = plan if self.provenance is None else self.provenance.then(plan)
        return x
