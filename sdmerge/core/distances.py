"""Cosine distances ``1 - cos(m_i, m_j)`` between the tokens of each sample, exactly symmetric.

Two layouts of one matrix: square ``[B, N, N]`` (the accelerator path's working matrix) and
condensed ``[B, N (N - 1) / 2]`` (the upper triangle row by row, scipy's ``squareform`` layout,
the host path's input). Both are built from the same blocks of the upper triangle, so
``condensed[b] == squareform(square[b])`` bit for bit: whichever path clusters, it clusters the
same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCE_BLOCK = 512  # rows per matrix-product block


def _upper_blocks(metric: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Blocks of rows of the upper triangle: ``(start, part)`` with ``part: [B, rows, N - start]``
    holding ``1 - u_i . u_j`` for rows ``i = start .. start + rows - 1`` and columns ``j >= start``.

    Products are computed in float32 (float64 if ``metric`` is float64). Each block's square part
    is made symmetric by the smaller of its two products, whatever the matrix library's summation
    order. ``part`` is a view into one buffer reused by the next block.
    """
    B, N, _ = metric.shape
    compute = torch.float64 if metric.dtype == torch.float64 else torch.float32
    unit = F.normalize(metric.detach().to(compute), dim=-1)
    block = min(N, DISTANCE_BLOCK)
    buffer = torch.empty(B * block * N, dtype=compute, device=metric.device)
    one = torch.ones((), dtype=compute, device=metric.device)
    for start in range(0, N, block):
        stop = min(N, start + block)
        part = buffer[: B * (stop - start) * (N - start)].view(B, stop - start, N - start)
        torch.baddbmm(one, unit[:, start:stop], unit[:, start:].transpose(-1, -2), alpha=-1, out=part)
        square = part[:, :, : stop - start]
        square.copy_(torch.minimum(square, square.transpose(-1, -2)))
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

    Meant for the host: one copy per matrix row (a masked select is ten times slower on a CPU)."""
    B, N, _ = metric.shape
    size = N * (N - 1) // 2
    out = torch.empty(B, size, dtype=torch.float64, device=metric.device)
    for start, part in _upper_blocks(metric):
        for row in range(part.shape[1]):
            i = start + row
            offset = N * i - i * (i + 1) // 2  # entries of the rows above row i
            out[:, offset : offset + N - 1 - i].copy_(part[:, row, row + 1 :])
    return out
