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

import torch
from torch import Tensor

from ..core import (
    MergePlan,
    alternating_split,
    head_mean_importance_score,
    importance_score,
    proportional_attention_bias,
)
from ..methods import Method, get_method
from .schedule import TokenSchedule, check_schedule, make_schedule


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
        prop_attn: add ``log(size)`` to the attention logits of every block after a reduction.
        cis_score: the CIS formula of ``cis`` (:data:`CIS_SCORES`, :func:`class_importance`).
    """

    method: Method
    schedule: TokenSchedule
    protected: int
    prop_attn: bool = True
    cis_score: str = "code"
    _removals: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_options(
        cls, method: str, depth: int, num_tokens: int, protected: int, r, *, stages, tokens_per_block, schedule, prop_attn,
        cis_score=None,
    ) -> "ReductionConfig":
        """Check the user's options of ``sdmerge.apply`` for a ``depth``-block model with
        ``num_tokens`` input tokens (``protected`` of them prefix tokens) and build the config.

        Raises ``ValueError`` for an unknown method, an invalid or ambiguous schedule
        (:func:`~sdmerge.vit.schedule.make_schedule`), one the method cannot follow at ``num_tokens``,
        or a ``cis_score`` that is not one of :data:`CIS_SCORES` or given with another method than ``cis``.
        """
        if not isinstance(prop_attn, bool):
            raise ValueError(f"prop_attn={prop_attn!r} must be True or False")
        chosen = get_method(method, "vit")
        if cis_score is not None and cis_score not in CIS_SCORES:
            raise ValueError(f"cis_score={cis_score!r} is not a CIS formula; allowed: {', '.join(CIS_SCORES)}")
        if cis_score is not None and chosen.name != "cis":
            raise ValueError(f"cis_score={cis_score!r} applies to method 'cis' only, not {method!r}")
        token_schedule = make_schedule(depth, r, stages=stages, tokens_per_block=tokens_per_block, schedule=schedule)
        config = cls(chosen, token_schedule, protected, prop_attn, "code" if cis_score is None else cis_score)
        config.removals(num_tokens)  # validate now, not at the first call
        return config

    def removals(self, num_tokens: int) -> tuple[int, ...]:
        """The checked removals per block for ``num_tokens`` input tokens (cached per count)."""
        if num_tokens not in self._removals:
            self._removals[num_tokens] = check_schedule(self.schedule, self.method, num_tokens, self.protected)
        return self._removals[num_tokens]


class ReductionState:
    """One forward call's reduction state; a new one is made for every call.

    Attributes:
        removals: tokens removed in each block for this call's token count.
        sizes: ``[B, N_l]`` float32, original tokens each current token stands for
            (``None`` until the first reduction: every token is one token).
        provenance: a :class:`~sdmerge.core.MergePlan` from the ``N_0`` input tokens to the
            current tokens (``labels [B, N_0]``; ``None`` until the first reduction); its
            ``merged_sizes`` equal ``sizes``.
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
        """``[B, 1, 1, N_l]`` = ``log(sizes)`` for proportional attention, or ``None``."""
        if not self.config.prop_attn or self.sizes is None:
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
        """Reduce ``x: [B, N, C]`` to ``[B, N - removals[block], C]`` with the recorded attention.

        Metric: keys averaged over heads (ToMe), ``[B, N, Dh]``. Merged tokens are averaged with the method's
        weights (sizes, or importance for ``cis``/``crucial``/``evit``); sizes add up and the
        provenance plan is composed with this block's plan.

        Token order after the reduction: bipartite methods (``tome``, ``cis``) follow ToMe's ViT
        implementation, protected tokens, then the unmerged sources (even positions), then all
        destinations (odd positions), each in ascending current position, so the next block's
        alternating split runs over that order; the other methods keep the tokens' relative order.
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
        x = plan.merge(x, weights=method.weights(self.sizes, importance))
        self.sizes = plan.merged_sizes
        self.provenance = plan if self.provenance is None else self.provenance.then(plan)
        return x
