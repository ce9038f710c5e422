"""What the libraries print during a sweep: only what concerns its user.

- diffusers' and transformers' progress bars (loading weights, pipeline calls) are off: the
  sweep shows its own;
- transformers' notice that an image processor falls back to its PIL backend because torchvision
  is not installed is dropped: importing diffusers' pipelines names two image processors
  (CLIP's, SigLIP's), and the sweep uses neither.

Every other warning still shows.
"""

from __future__ import annotations

import logging

TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"
"""The text of transformers' notice (``transformers.utils.import_utils``)."""


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return TORCHVISION_FALLBACK not in record.getMessage()


def quiet_libraries() -> None:
    """Apply the settings above (before the first pipeline import; repeated calls change nothing)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
