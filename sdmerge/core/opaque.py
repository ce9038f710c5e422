"""Groupings that ``torch.compile`` cannot trace, as opaque custom ops.

Agglomerative clustering (ATC) runs data-dependent loops with host reads (``.item()``,
``nonzero``, shapes that change from round to round): dynamo would break the graph many times
per call and recompile as the shapes change. Inside a compiled region it runs instead as one
custom op, ``sdmerge::agglomerative_labels``, whose output shape (``[B, N]`` labels) is known
from its inputs: the op stays in the graph (no graph break, no guard on what the clustering
does) and runs eagerly when the graph runs. Outside compilation nothing here is used.
Needs ``torch.library.custom_op`` (torch >= 2.4); without it the clustering is traced as before.
"""

from __future__ import annotations

import torch
from torch import Tensor

_custom_op = getattr(torch.library, "custom_op", None)


def is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


def _agglomerative_labels(metric: Tensor, remove: int, linkage: str, protected: int) -> Tensor:
    from .agglomerative import agglomerative_clustering

    return agglomerative_clustering(metric, remove, linkage, protected).labels.clone()


if _custom_op is not None:
    opaque_agglomerative_labels = _custom_op("sdmerge::agglomerative_labels", mutates_args=())(_agglomerative_labels)

    @opaque_agglomerative_labels.register_fake
    def _(metric: Tensor, remove: int, linkage: str, protected: int) -> Tensor:
        return metric.new_empty(metric.shape[:2], dtype=torch.int64)

else:  # pragma: no cover - old torch
    opaque_agglomerative_labels = None
