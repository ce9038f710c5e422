"""The options of ``sdmerge.apply`` for ViT/DeiT classifiers, declared once (:mod:`sdmerge.options`).

Both ViT integrations (transformers, timm) take exactly these; validation of each value, the
unknown-option error and the option list of ``help(sdmerge.apply)`` are built from them. Rules
that tie options to the method or the model (a schedule the method can follow at the model's
token count, a formula of another method) are checked by :class:`~sdmerge.vit.reduction.ReductionConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import BLOCK_INDICES, BOOLEAN, check_fields, check_names, choice, integer, option, optional
from .reduction import CIS_SCORES, EVIT_FUSIONS
from .schedule import PER_BLOCK_SCHEDULES

FAMILY = "ViT/DeiT classifiers"
"""How errors name this family of options."""


@dataclass(frozen=True)
class ReductionOptions:
    """The keyword options of ``sdmerge.apply`` for a ViT/DeiT classifier; checked on construction."""

    stages: tuple[int, ...] | None = option(
        None, optional(BLOCK_INDICES), "0-based indices of the reducing blocks (stage "
        "protocol: floor(P r^s) of the P patch tokens kept after stage s); None: floor(k L / 4), k = 1, 2, 3",
    )
    tokens_per_block: int | None = option(
        None, optional(integer(0)), "tokens removed in every block (ToMe's per-block protocol), instead of r and stages"
    )
    schedule: str | None = option(
        None, optional(choice(*PER_BLOCK_SCHEDULES)), "with tokens_per_block: 'constant' (t in every block, the "
        "default) or 'linear' (ToMe's floor(2t - 2tl / (L - 1)))",
    )
    prop_attn: bool = option(True, BOOLEAN, "proportional attention: log(size) on the attention logits of merged tokens")
    cis_score: str | None = option(
        None, optional(choice(*CIS_SCORES)), "cis only: 'code' (default: mean_h(A_cls) * ||mean_h(V)||, the ToMeCIS "
        "code) or 'paper' (mean_h(A_cls * ||V||))",
    )
    evit_fusion: str | None = option(
        None, optional(choice(*EVIT_FUSIONS)), "evit only: 'code' (default: the fused token is sum_i a_i x_i, EViT's "
        "code) or 'paper' (divided by sum_i a_i)",
    )

    def __post_init__(self):
        check_fields(self)

    @classmethod
    def from_options(cls, options: dict) -> "ReductionOptions":
        """``TypeError`` for an unknown option (listing the accepted ones), else the checked options."""
        check_names(cls, options, FAMILY)
        return cls(**options)
