"""Image generation for the sweep: make one image per work item with a loaded pipeline, resume.

Resume rule: the image files are the source of truth. An image is finished when its final PNG
exists; it is written to a temporary file and renamed (``eval/atomic.py``), so a kill leaves
either the whole PNG or none. Its timing goes to a JSON sidecar written (atomically) *before*
the PNG, so every finished image has its timing. A rerun of the same command skips finished
images and makes the rest; since each image depends only on its own seed (initial noise and
the merging's random choices), the result equals an uninterrupted run's.

Timing, the same for every arm: the wall time of the whole pipeline call (text encoding, the
denoising loop with guidance, VAE decoding, conversion to PIL), batch size 1, between two
``torch.cuda.synchronize`` calls on CUDA. Patching and unpatching are outside the timed call.
The first call of every arm in every process is a warm-up with the arm's first pending image:
it is timed by nobody and its image is discarded.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from itertools import groupby
from pathlib import Path

import torch
from PIL import Image

import sdmerge
from sdmerge.methods import get_method

from .atomic import write_atomically, write_json
from .worklist import WorkItem

TIMING = "wall time of the whole pipeline call, batch 1, warm-up call per arm and process excluded, CUDA synchronised"


@dataclass(frozen=True)
class GenerationSettings:
    """What every pipeline call of a sweep is given (``eval/families.py`` fills in its model's defaults)."""

    steps: int
    guidance_scale: float
    resolution: int  # square images, pixels
    call_options: Mapping[str, object] = field(default_factory=dict)  # the family's other call arguments


def image_path(images_dir: Path, item: WorkItem) -> Path:
    """``images_dir/{arm}/{class_index:04d}_{image_index}.png``."""
    return images_dir / item.arm.name / f"{item.stem}.png"


def timing_path(images_dir: Path, item: WorkItem) -> Path:
    """The JSON sidecar beside the image: ``images_dir/{arm}/{class_index:04d}_{image_index}.json``."""
    return image_path(images_dir, item).with_suffix(".json")


class ImageMaker:
    """Makes the image of a work item with ``pipe``, patched for the item's arm, then restored.

    Bipartite methods (tome, cis) draw their random source/destination split from a generator
    that sdmerge re-seeds at every UNet or transformer call from ``(seed, timestep)``; the item's own seed is
    passed, so the splits of an image do not depend on which images came before it. The other
    methods are deterministic and take no seed. The arm's plan reuse (``plan_every``,
    ``share_plans``) is passed as it is, and sdmerge's defaults choose the blocks for the
    model's family (UNet: the highest-resolution ones; transformer: all but the first and last).
    """

    def __init__(self, pipe, settings: GenerationSettings, device: torch.device):
        self.pipe = pipe
        self.settings = settings
        self.device = device

    def __call__(self, item: WorkItem) -> tuple[Image.Image, float]:
        """Returns ``(image, seconds of the pipeline call)``."""
        arm = item.arm
        if arm.method is not None:
            seeded = get_method(arm.method, "sd").needs_split
            sdmerge.apply(
                self.pipe,
                arm.method,
                arm.keep_rate,
                plan_every=arm.plan_every,
                share_plans=arm.share_plans,
                **({"seed": item.seed} if seeded else {}),
            )
        try:
            noise = torch.Generator("cpu").manual_seed(item.seed)
            self._synchronize()
            start = time.perf_counter()
            image = self.pipe(
                item.prompt,
                height=self.settings.resolution,
                width=self.settings.resolution,
                num_inference_steps=self.settings.steps,
                guidance_scale=self.settings.guidance_scale,
                generator=noise,
                **self.settings.call_options,
            ).images[0]
            self._synchronize()
            return image, time.perf_counter() - start
        finally:
            if arm.method is not None:
                sdmerge.remove(self.pipe)

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def generate(
    items: Sequence[WorkItem],
    images_dir: Path,
    make_image: Callable[[WorkItem], tuple[Image.Image, float]],
    origin: dict,
    on_image: Callable[[], None] = lambda: None,
) -> None:
    """Make every image of ``items`` whose PNG does not exist yet.

    ``items`` must be grouped by arm (as the work list is); ``origin`` (the device and the
    process) goes into every sidecar; ``on_image()`` runs after each image.
    """
    for _, arm_items in groupby(items, key=lambda item: item.arm):
        pending = [item for item in arm_items if not image_path(images_dir, item).exists()]
        if not pending:
            continue
        make_image(pending[0])  # warm-up: not timed, image discarded
        for item in pending:
            image, seconds = make_image(item)
            write_json(
                timing_path(images_dir, item),
                {"seconds": seconds, "seed": item.seed, "prompt": item.prompt, **origin},
            )
            write_atomically(image_path(images_dir, item), partial(image.save, format="PNG"))
            on_image()


def read_timing(images_dir: Path, item: WorkItem) -> dict | None:
    """The sidecar of a finished image (``seconds``, ``seed``, ``prompt``, ``device``, ``process``), or None."""
    path = timing_path(images_dir, item)
    return json.loads(path.read_text()) if path.is_file() else None
