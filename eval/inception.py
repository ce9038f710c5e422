"""The real protocol's feature extractor: torchmetrics' Inception-v3 (2048-d pool features).

torchmetrics' ``NoTrainInceptionV3`` is the network ``FrechetInceptionDistance(feature=2048)``
uses. It needs the ``torch-fidelity`` package, which imports torchvision: install the
``fidelity`` extra (``pip install -e ".[fidelity]"``) on the GPU machine, where a CUDA build of
torch is wanted anyway. Without ``--inception-weights`` torch-fidelity downloads its weights
(``pt_inception-2015-12-05-6726825d.pth``) on first use; with it, that file is read from disk.

Preprocessing, as torchmetrics does it: the whole uint8 image (no crop) is resized to 299x299
by bilinear interpolation with ``antialias=True`` (torchmetrics' default since 1.8; aspect
ratio not kept), then scaled to ``(x - 128) / 128``; the extractor runs in float32.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import version
from pathlib import Path

from .errors import OFFLINE_HINT, UserError
from .fid import FeatureExtractor

RESIZE = "whole image resized to 299x299, bilinear, antialias=True (aspect ratio not kept); float32"


def inception_extractor(weights: Path | None) -> FeatureExtractor:
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d), from ``weights`` or torch-fidelity's download.

    Raises :class:`UserError` naming the fix when the weights file, torch-fidelity (or the
    torchvision it imports) or the download is missing. The sweep calls this before generating,
    so a day of generation does not end on a missing file.
    """
    if weights is not None and not weights.is_file():
        raise UserError(
            f"--inception-weights: no file at {weights}. Pass the torch-fidelity Inception weights "
            f"(pt_inception-2015-12-05-6726825d.pth), omit the flag to let torch-fidelity download them, "
            f"{OFFLINE_HINT}"
        )
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception lives there; it imports torchvision)
    except ImportError as error:
        raise UserError(
            f"FID with torchmetrics' Inception needs torch-fidelity and torchvision ({error}): "
            f'pip install -e ".[fidelity]" on the GPU machine, {OFFLINE_HINT}'
        ) from None
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        module = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048"],
            feature_extractor_weights_path=None if weights is None else str(weights),
            antialias=True,
        )
    except Exception as error:  # a failed download surfaces as URLError, OSError, RuntimeError...
        raise UserError(
            f"could not load the Inception weights ({type(error).__name__}: {error}). On a machine "
            f"without internet pass --inception-weights PATH (pt_inception-2015-12-05-6726825d.pth), " + OFFLINE_HINT
        ) from None
    identity = {
        "name": "torchmetrics NoTrainInceptionV3 (inception-v3-compat, torch-fidelity), pool features",
        "dims": 2048,
        "weights": "torch-fidelity download" if weights is None else str(weights.resolve()),
        "weights_sha256": None if weights is None else _sha256(weights),
        "resize": RESIZE,
        "torchmetrics": version("torchmetrics"),
        "torch_fidelity": version("torch-fidelity"),
    }
    return FeatureExtractor(module, identity)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
