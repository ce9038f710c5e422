"""The seed of every generated image, a function of (class, image index) alone.

``seed = base_seed + 10 * class_index + image_index`` for ``0 <= image_index < 10``: the ATC
authors' formula (``args.seed + int(str(cls_idx) + str(img_idx))`` in their ``sd_generate.py``),
written as arithmetic. Every method and keep rate uses the same seeds, so two arms differ only
by the merging. The formula gives distinct seeds only while ``image_index < 10``, hence the limit.

The seed drives a CPU ``torch.Generator`` for the initial latents (see ``eval/generate.py``), so
an image's noise does not depend on the GPU, the process that draws it, or the order of work.
"""

from __future__ import annotations

from .errors import UserError

MAX_IMAGES_PER_CLASS = 10
FORMULA = "base_seed + 10 * class_index + image_index"


def image_seed(class_index: int, image_index: int, base_seed: int = 0) -> int:
    """The seed of image ``image_index`` of class ``class_index`` (see the module docstring)."""
    if not 0 <= image_index < MAX_IMAGES_PER_CLASS:
        raise UserError(f"image index {image_index} is out of range: at most {MAX_IMAGES_PER_CLASS} images per class")
    return base_seed + 10 * class_index + image_index
