"""Fréchet distance between two Gaussians fitted to image features, and the features of image files.

The FID of two image sets is the Fréchet distance between Gaussians fitted to their features
(Heusel et al. 2017):

    FID = ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))

``tr((S_1 S_2)^(1/2))`` is computed as the sum of square roots of the eigenvalues of the
symmetric positive semi-definite ``S_1^(1/2) S_2 S_1^(1/2)`` (which has the eigenvalues of
``S_1 S_2``), all in float64: no complex parts to discard, and singular covariances (fewer
images than feature dimensions, as in the 2000-image protocol) are handled.

Features come from a :class:`FeatureExtractor`: a module mapping uint8 RGB images
``[B, 3, H, W]`` to ``[B, D]`` float features (torchmetrics' Inception, or the smoke preset's
small network), with a description of itself that is recorded with every number.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .atomic import write_atomically


@dataclass(frozen=True)
class FeatureExtractor:
    """``module``: uint8 ``[B, 3, H, W]`` -> float ``[B, D]`` (it resizes internally);
    ``identity``: what it is, recorded with every number (name, weights, resize mode, ...)."""

    module: torch.nn.Module
    identity: dict


@dataclass(frozen=True)
class GaussianStats:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``count`` feature vectors."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStats:
        """Statistics of ``features: [N, D]``, ``N >= 2``."""
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False)), len(features))

    def save(self, path: Path, provenance: str) -> None:
        """Write ``mean``, ``cov``, ``count`` and a provenance string to one ``.npz`` file, atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, cov=self.cov, count=self.count, provenance=provenance)
        write_atomically(path, lambda f: f.write(buffer.getvalue()))

    @classmethod
    def load(cls, path: Path, provenance: str) -> GaussianStats | None:
        """The statistics saved at ``path`` if they were saved with this ``provenance``, else None."""
        if not path.is_file():
            return None
        with np.load(path) as data:
            if str(data["provenance"]) != provenance:
                return None
            return cls(data["mean"], data["cov"], int(data["count"]))


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """Fréchet distance between ``N(a.mean, a.cov)`` and ``N(b.mean, b.cov)`` (module docstring)."""
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature dimensions differ: {a.mean.shape[0]} vs {b.mean.shape[0]}")
    root_a = _psd_sqrt(a.cov)
    inner = np.linalg.eigvalsh(root_a @ b.cov @ root_a)
    trace_sqrt = np.sqrt(np.clip(inner, 0.0, None)).sum()
    diff = a.mean - b.mean
    return float(diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding
    errors in its eigenvalues clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def load_image(path: Path) -> torch.Tensor:
    """The image at ``path`` as uint8 RGB ``[3, H, W]``."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_batches(paths: Sequence[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 ``[B, 3, H, W]`` batches of consecutive images of one size (``B <= batch_size``);
    a change of size starts a new batch, so images of any size pass unchanged to the extractor."""
    batch: list[torch.Tensor] = []
    for path in paths:
        image = load_image(path)
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield torch.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield torch.stack(batch)


@torch.no_grad()
def image_statistics(
    paths: Sequence[Path],
    extractor: FeatureExtractor,
    device: torch.device,
    batch_size: int = 50,
    on_batch: Callable[[int], None] = lambda n: None,
) -> GaussianStats:
    """Feature statistics of the images at ``paths`` (extractor in float32 on ``device``);
    ``on_batch(n)`` is called after every batch of ``n`` images (progress)."""
    module = extractor.module.to(device).eval()
    features = []
    for batch in image_batches(paths, batch_size):
        features.append(module(batch.to(device)).double().cpu())
        on_batch(len(batch))
    return GaussianStats.of(torch.cat(features).numpy())
