"""The merging methods, by name: each is a grouping plus a weighting, built from the core.

Integrations (Stable Diffusion, ViT) decide *where* to reduce and supply the inputs; this
module decides *how* a method turns them into a plan and merge weights.

=============  ==========================  ==================  ===========
method         grouping                    merge weights       models
=============  ==========================  ==================  ===========
tome           bipartite soft matching     sizes               sd, vit
atc_single     agglomerative, single       sizes               sd, vit
atc_complete   agglomerative, complete     sizes               sd, vit
atc_average    agglomerative, average      sizes               sd, vit
cis            bipartite soft matching     importance          sd, vit
crucial        crucial tokens (MSTM)       importance          sd, vit
grid           sy x sx windows (ToDo)      sizes               sd
topk           top-k pruning               (kept unchanged)    vit
evit           top-k + one fused token     attention (sum)     vit
=============  ==========================  ==================  ===========

Sizes: merging methods give every merged token the number of tokens it stands for (the sizes
of proportional attention and size-weighted pooling). The pruning methods (``topk``, ``evit``)
merge nothing of equal weight: their tokens keep size 1, EViT's fused token included.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .core import (
    MergePlan,
    agglomerative_clustering,
    bipartite_soft_matching,
    crucial_token_merging,
    evit_fusion,
    top_k_pruning,
    window_groups,
)


@dataclass(frozen=True)
class Method:
    name: str
    grouping: str  # "bipartite" | "agglomerative" | "crucial" | "grid" | "topk" | "evit"
    linkage: str | None = None
    importance_weighted: bool = False
    models: tuple[str, ...] = ("sd", "vit")

    @property
    def needs_importance(self) -> bool:
        """Whether the method needs a per-token importance score to group or to weight."""
        return self.importance_weighted or self.grouping in ("crucial", "topk", "evit")

    @property
    def prunes(self) -> bool:
        """Whether the method is a pruning baseline (``topk``, ``evit``): its tokens keep size 1,
        so proportional attention and size-weighted pooling have nothing to act on."""
        return self.grouping in ("topk", "evit")

    @property
    def fused_tokens(self) -> int:
        """Tokens a reduction adds besides the tokens it keeps: EViT's fused token (1), else 0."""
        return int(self.grouping == "evit")

    @property
    def needs_split(self) -> bool:
        """Whether the method needs a source/destination split (bipartite matching)."""
        return self.grouping == "bipartite"

    @property
    def needs_grid(self) -> bool:
        """Whether the method groups by the tokens' 2D grid (a split of it, or its windows)."""
        return self.grouping in ("bipartite", "grid")

    def plan(
        self,
        metric: Tensor,
        remove: int,
        *,
        protected: int = 0,
        sizes: Tensor | None = None,
        importance: Tensor | None = None,
        split: tuple[Tensor, Tensor] | None = None,
        split_order: bool = False,
        grid: tuple[int, int] | None = None,
        window: tuple[int, int] | None = None,
        partial_windows: str = "keep",
    ) -> MergePlan:
        """Group ``metric: [B, N, D]`` so that ``remove`` tokens leave the kept set.

        The plan has ``N - remove`` groups, plus :attr:`fused_tokens` (EViT fuses the ``remove``
        pruned tokens into one extra token: ``N - remove + 1`` groups).

        ``split``: ``(src, dst)`` token indices for bipartite methods; ``importance``: ``[B, N]``
        for the methods that need it. ``protected`` prefix tokens are never merged (bipartite
        methods protect them through the split). ``split_order``: bipartite methods number their
        groups in ToMe's ViT order (:func:`~sdmerge.core.bipartite_soft_matching`, ``order="split"``);
        every grouping otherwise keeps the tokens' relative order. ``grid`` ``(h, w)`` and ``window``
        ``(sy, sx)``: the grid grouping's token grid and window; its plan has one group per window
        (``remove`` tokens go when the windows tile the grid); ``partial_windows``: what becomes of
        the windows the grid's edge cuts (:func:`~sdmerge.core.window_groups`).
        """
        if split_order and not self.needs_split:
            raise ValueError(f"method {self.name!r} has no source/destination split to order tokens by")
        if self.needs_importance and importance is None and self.grouping != "bipartite":
            raise ValueError(f"method {self.name!r} needs an importance score")
        if self.grouping == "bipartite":
            if split is None:
                raise ValueError(f"method {self.name!r} needs a source/destination split")
            order = "split" if split_order else "position"
            return bipartite_soft_matching(metric, remove, *split, sizes=sizes, order=order)
        if self.grouping == "agglomerative":
            return agglomerative_clustering(metric, remove, self.linkage, protected=protected, sizes=sizes)
        if self.grouping == "grid":
            if grid is None or window is None:
                raise ValueError(f"method {self.name!r} needs the token grid and the window")
            return window_groups(
                metric.shape[0], *grid, *window, sizes=sizes, device=metric.device, partial_windows=partial_windows
            )
        if self.grouping == "crucial":
            return crucial_token_merging(metric, importance, remove, protected=protected, sizes=sizes)
        if self.grouping == "topk":
            return top_k_pruning(importance, remove, protected=protected, sizes=sizes)
        return evit_fusion(importance, remove, protected=protected, sizes=sizes)

    def weights(self, sizes: Tensor | None, importance: Tensor | None) -> Tensor | None:
        """Merge weights ``[B, N]``: importance for importance-weighted methods when a score
        exists, else sizes (``None``: plain mean)."""
        if self.importance_weighted and importance is not None:
            return importance
        return sizes


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("tome", "bipartite"),
        Method("atc_single", "agglomerative", linkage="single"),
        Method("atc_complete", "agglomerative", linkage="complete"),
        Method("atc_average", "agglomerative", linkage="average"),
        Method("cis", "bipartite", importance_weighted=True),
        Method("crucial", "crucial", importance_weighted=True),
        Method("grid", "grid", models=("sd",)),
        Method("topk", "topk", models=("vit",)),
        Method("evit", "evit", importance_weighted=True, models=("vit",)),
    )
}


def get_method(name: str, model: str) -> Method:
    """The method called ``name`` for a model kind (``"sd"`` or ``"vit"``); a clear error otherwise."""
    valid = [m for m in METHODS.values() if model in m.models]
    method = METHODS.get(name)
    if method is None or model not in method.models:
        where = "" if method is None else f" for {model} models"
        raise ValueError(f"unknown method {name!r}{where}; valid methods: {', '.join(m.name for m in valid)}")
    return method
