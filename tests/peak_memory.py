"""Peak resident memory of exact clustering on the CPU path, measured in this (fresh) process.

``MALLOC_MMAP_THRESHOLD_=65536 python -m tests.peak_memory TOKENS FEATURES LINKAGE BATCH [BATCH ...]``
prints one JSON object per batch: ``{"batch", "increase", "predicted"}``, where ``increase`` is
the process's peak resident bytes during ``cluster(metric, TOKENS // 3, LINKAGE, path="cpu")``
less its resident bytes right before (Linux: the peak is reset through ``/proc/self/clear_refs``
and read as ``VmHWM``), and ``predicted`` is :func:`sdmerge.core.agglomerative.clustering_bytes`.

Before measuring, a first clustering loads the code and the distances of every batch are built
once, so that the matrix library's workspace for these products (which it allocates once and
keeps, and which the bound leaves to the memory check's margin) is not counted. The glibc
setting hands every block of 64 KiB or more back to the system when it is freed, so that each
call's working memory is measured instead of hidden in blocks an earlier call freed.
"""

from __future__ import annotations

import json
import sys

import torch

from sdmerge.core.agglomerative import cluster, clustering_bytes
from sdmerge.core.distances import condensed_cosine_distances


def resident_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last reset) of this process, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_increase(metric: torch.Tensor, linkage: str) -> int:
    """Peak resident bytes added while the CPU path clusters ``metric``."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak (VmHWM) restarts from the current resident size
    before = resident_bytes("VmRSS")
    cluster(metric, metric.shape[1] // 3, linkage, path="cpu")
    return resident_bytes("VmHWM") - before


def main(tokens: int, features: int, linkage: str, batches: list[int]) -> None:
    torch.set_num_threads(2)  # the samples of batch 2 are clustered at once: the peak to bound
    generator = torch.Generator().manual_seed(0)
    cluster(torch.randn(2, 600, features, generator=generator), 200, linkage, path="cpu")
    for batch in batches:
        condensed_cosine_distances(torch.randn(batch, tokens, features, generator=generator))
    for batch in batches:
        metric = torch.randn(batch, tokens, features, generator=generator)
        increase = peak_increase(metric, linkage)
        predicted = clustering_bytes(batch, tokens, features, metric.dtype, torch.float64, "cpu")
        print(json.dumps({"batch": batch, "increase": increase, "predicted": predicted}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], [int(batch) for batch in sys.argv[4:]])
