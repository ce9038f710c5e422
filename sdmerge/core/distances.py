"""Cosine distances ``1 - cos(m_i, m_j)`` between the tokens of each sample, exactly symmetric.

Two layouts of one matrix: square ``[B, N, N]`` (the accelerator path's working matrix) and
condensed ``[B, N (N - 1) / 2]`` (the upper triangle row by row, scipy's ``squareform`` layout,
the host path's input). Both are built from the same blocks of the upper triangle, so
``condensed[b] == squareform(square[b])`` bit for bit: whichever path clusters, it clusters the
same numbers. :func:`condensed_bytes` and :func:`working_bytes` bound the memory they take.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCE_BLOCK = 512  # rows per matrix-product block


def _upper_blocks(metric: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Blocks of rows of the upper triangle: ``(start, part)`` with ``part: [B, rows, N - start]``
    holding ``1 - u_i . u_j`` for rows ``i = start .. start + rows - 1`` and columns ``j >= start``.

    Products are computed in :func:`product_dtype`. Each block's square part
    is made symmetric by the smaller of its two products, whatever the matrix library's summation
    order. ``part`` is a view into one buffer reused by the next block, and so is the smaller
    products' scratch: the memory taken is the same at every block (:func:`working_bytes`).
    """
    B, N, _ = metric.shape
    compute = product_dtype(metric.dtype)
    unit = F.normalize(metric.detach().to(compute), dim=-1)
    block = min(N, DISTANCE_BLOCK)
    buffer = torch.empty(B * block * N, dtype=compute, device=metric.device)
    scratch = torch.empty(B * block * block, dtype=compute, device=metric.device)
    one = torch.ones((), dtype=compute, device=metric.device)
    for start in range(0, N, block):
        rows = min(N, start + block) - start
        part = buffer[: B * rows * (N - start)].view(B, rows, N - start)
        torch.baddbmm(one, unit[:, start : start + rows], unit[:, start:].transpose(-1, -2), alpha=-1, out=part)
        square = part[:, :, :rows]
        smaller = scratch[: B * rows * rows].view(B, rows, rows)
        square.copy_(torch.minimum(square, square.transpose(-1, -2), out=smaller))
        yield start, part


@torch.no_grad()
def cosine_distances(metric: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Square distances ``[B, N, D] -> [B, N, N]`` stored as ``dtype``, zero diagonal, no gradient:
    the upper triangle's blocks, mirrored. This is the matrix whose scipy clustering
    :func:`~sdmerge.core.cluster` reproduces, on every path."""
    B, N, _ = metric.shape
    out = torch.empty(B, N, N, dtype=dtype, device=metric.device)
    for start, part in _upper_blocks(metric):
        stop = start + part.shape[1]
        out[:, start:stop, start:].copy_(part)
        out[:, start:, start:stop].copy_(part.transpose(-1, -2))
    out.diagonal(dim1=-2, dim2=-1).zero_()
    return out


@torch.no_grad()
def condensed_cosine_distances(metric: Tensor) -> Tensor:
    """Condensed float64 distances ``[B, N, D] -> [B, N (N - 1) / 2]``: entry ``(i, j)``, ``i < j``,
    at ``N i - i (i + 1) / 2 + j - i - 1`` (scipy's layout), equal to
    ``squareform(cosine_distances(metric)[b])`` bit for bit, without the square matrix.

    Meant for the host: one copy per matrix row (a masked select is ten times slower on a CPU).
    On a CPU the result is allocated by numpy, whose allocator asks Linux for huge pages:
    fastcluster clusters in this buffer, and runs much faster on huge pages (docs/benchmarks.md)."""
    B, N, _ = metric.shape
    size = N * (N - 1) // 2
    if metric.device.type == "cpu":
        out = torch.from_numpy(np.empty((B, size), dtype=np.float64))
    else:
        out = torch.empty(B, size, dtype=torch.float64, device=metric.device)
    for start, part in _upper_blocks(metric):
        for row in range(part.shape[1]):
            i = start + row
            offset = N * i - i * (i + 1) // 2  # entries of the rows above row i
            out[:, offset : offset + N - 1 - i].copy_(part[:, row, row + 1 :])
    return out


def condensed_bytes(batch: int, tokens: int) -> int:
    """Bytes of the condensed float64 distances ``[B, N (N - 1) / 2]``."""
    return 8 * batch * tokens * (tokens - 1) // 2


def product_dtype(metric_dtype: torch.dtype) -> torch.dtype:
    """The dtype the distances are computed in from a metric of ``metric_dtype``: float64 for a
    float64 metric, else float32."""
    return torch.float64 if metric_dtype == torch.float64 else torch.float32


def working_bytes(batch: int, tokens: int, features: int, metric_dtype: torch.dtype) -> int:
    """Peak bytes that building either layout from a ``[B, N, D]`` metric of ``metric_dtype``
    allocates on its device besides the output, an upper bound. In :func:`product_dtype`: the
    unit features ``B N D`` and their norms ``2 B N``, and the larger of the metric's converted
    copy ``B N D`` (only while normalising, only if the metric is not in that dtype) and the
    block of products ``B x DISTANCE_BLOCK x N`` with its scratch
    ``B x DISTANCE_BLOCK x DISTANCE_BLOCK``. Not counted: the matrix library's own workspace
    (MKL allocates packing buffers at its first products of a size and keeps them, tens of MB;
    the host memory check's margin covers it)."""
    compute = product_dtype(metric_dtype)
    block = min(tokens, DISTANCE_BLOCK)
    copy = tokens * features if metric_dtype != compute else 0
    entries = tokens * (features + 2) + max(copy, block * (tokens + block))
    return torch.empty((), dtype=compute).element_size() * batch * entries
