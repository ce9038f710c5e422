"""The model families the sweep runs: which one a model is, how it is loaded and called, and its
protocol defaults.

A model (``--model``: a hub id or a local diffusers folder) is recognised by the ``_class_name``
of its ``model_index.json``, the file ``from_pretrained`` reads first; nothing else is read or
downloaded before the family is known. The family's pipeline class then loads the model with
``from_pretrained(model, dtype=...)``.

Defaults, used where neither a flag nor the preset sets a value (``scripts/fid_sweep.py``):

- steps and guidance: the family's pipeline's own ``__call__`` defaults in diffusers (SD: 50
  PLMS steps, guidance 7.5; SD3: 28, 7.0; PixArt-alpha and -sigma: 20, 4.5), kept here as the
  protocol (a test holds them against the installed diffusers);
- resolution: the model's native size, ``sample_size`` of its UNet or transformer times the VAE
  factor, as the pipeline uses when called without ``height``/``width`` (SD-1.5: 512; SD3 / SD3.5,
  PixArt-sigma and -alpha 1024: 1024; their 512 / 256 variants: 512 / 256).

The prompt reaches every family as it is: PixArt's caption cleaning (which rewrites the prompt
and needs bs4 and ftfy) is off, and so is its resolution binning (which would generate at the
nearest trained aspect-ratio size and resize; a square image at the native size is its own bin).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import OFFLINE_HINT, UserError
from .generate import GenerationSettings

MODEL_INDEX = "model_index.json"


@dataclass(frozen=True)
class Family:
    """Models loaded by one diffusers pipeline class, and how the sweep runs them."""

    name: str  # the output subfolder and the results' ``family``
    pipeline: str  # the diffusers class: model_index.json's ``_class_name``
    models: str  # what it covers, in words
    steps: int
    guidance_scale: float
    denoiser: str  # the pipeline's attribute holding the UNet or transformer
    load_options: Mapping[str, object] = field(default_factory=dict)  # more from_pretrained arguments
    call_options: Mapping[str, object] = field(default_factory=dict)  # more arguments of every pipeline call

    def load(self, model: str, device: torch.device, dtype: torch.dtype):
        """``{pipeline}.from_pretrained(model, dtype=dtype)`` on ``device``, progress bars off; a
        :class:`UserError` naming ``--model`` if it fails."""
        import diffusers

        try:
            pipe = getattr(diffusers, self.pipeline).from_pretrained(model, dtype=dtype, **self.load_options)
        except (OSError, ValueError) as error:
            raise UserError(
                f"--model: cannot load a {self.pipeline} from {model!r} ({_first_line(error)}). Pass --model "
                f"with a hub id reachable from here or a local folder holding {MODEL_INDEX}, {OFFLINE_HINT}"
            ) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def native_resolution(self, pipe) -> int:
        """The image side the pipeline makes when called without a size."""
        return self._denoiser_config(pipe).sample_size * pipe.vae_scale_factor

    def size_multiple(self, pipe) -> int:
        """Image sides must be multiples of this: the VAE factor, times the patch size of a transformer."""
        return pipe.vae_scale_factor * getattr(self._denoiser_config(pipe), "patch_size", 1)

    def max_resolution(self, pipe) -> int | None:
        """The largest image side, where the model's position embedding has a largest grid (SD3's
        ``pos_embed_max_size``); None where it has none."""
        grid = getattr(self._denoiser_config(pipe), "pos_embed_max_size", None)
        return None if grid is None else grid * self.size_multiple(pipe)

    def settings(
        self,
        pipe,
        steps: int | None = None,
        guidance_scale: float | None = None,
        resolution: int | None = None,
    ) -> GenerationSettings:
        """The generation settings of ``pipe``: the values given, the family's defaults for the
        rest (module docstring). A resolution the model cannot make is a :class:`UserError`."""
        resolution = self.native_resolution(pipe) if resolution is None else resolution
        multiple, largest = self.size_multiple(pipe), self.max_resolution(pipe)
        if resolution < multiple or resolution % multiple or (largest is not None and resolution > largest):
            raise UserError(
                f"--resolution {resolution}: must be a positive multiple of {multiple}"
                + ("" if largest is None else f" up to {largest}")
                + f" for this {self.pipeline} (its native size: {self.native_resolution(pipe)})"
            )
        return GenerationSettings(
            steps=self.steps if steps is None else steps,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            resolution=resolution,
            call_options=dict(self.call_options),
        )

    def as_loaded(self, pipe) -> dict:
        """The pipeline as loaded, before patching, for the results: its scheduler, the denoiser's
        attention processors and the safety checker."""
        processors = getattr(pipe, self.denoiser).attn_processors.values()
        return {
            "scheduler": type(pipe.scheduler).__name__,
            "attention_processors": sorted({type(p).__name__ for p in processors}),
            "safety_checker": "off" if "safety_checker" in self.load_options else "none in this pipeline",
        }

    def _denoiser_config(self, pipe):
        return getattr(pipe, self.denoiser).config


_PIXART_CALL = {"clean_caption": False, "use_resolution_binning": False}
FAMILIES = (
    Family(
        "sd",
        "StableDiffusionPipeline",
        "Stable Diffusion 1.x / 2.x",
        steps=50,
        guidance_scale=7.5,
        denoiser="unet",
        load_options={"safety_checker": None, "requires_safety_checker": False},
    ),
    Family(
        "sd3",
        "StableDiffusion3Pipeline",
        "Stable Diffusion 3 / 3.5",
        steps=28,
        guidance_scale=7.0,
        denoiser="transformer",
    ),
    Family(
        "pixart_sigma",
        "PixArtSigmaPipeline",
        "PixArt-Σ",
        steps=20,
        guidance_scale=4.5,
        denoiser="transformer",
        call_options=_PIXART_CALL,
    ),
    Family(
        "pixart_alpha",
        "PixArtAlphaPipeline",
        "PixArt-α",
        steps=20,
        guidance_scale=4.5,
        denoiser="transformer",
        call_options=_PIXART_CALL,
    ),
)
"""Every family the sweep runs, by pipeline class."""


def supported() -> str:
    """``"StableDiffusionPipeline (Stable Diffusion 1.x / 2.x), ..."`` for messages."""
    return ", ".join(f"{family.pipeline} ({family.models})" for family in FAMILIES)


def detect_family(model: str) -> Family:
    """The family of ``model`` (a local folder or a hub id) from its ``model_index.json``, the
    only file read (from the hub: downloaded to the hub cache, where ``from_pretrained`` finds it).

    Raises :class:`UserError` naming ``--model`` when there is no such file, and naming the
    supported pipeline classes when the model's is not one of them.
    """
    index = _read_model_index(model)
    class_name = index.get("_class_name") if isinstance(index, dict) else None
    for family in FAMILIES:
        if family.pipeline == class_name:
            return family
    raise UserError(
        f"--model {model!r} is a {class_name or 'pipeline without a _class_name'} (its {MODEL_INDEX}); "
        f"the sweep runs {supported()}"
    )


def _read_model_index(model: str) -> object:
    folder = Path(model)
    try:
        if folder.is_dir():
            path = folder / MODEL_INDEX
            if not path.is_file():
                raise FileNotFoundError(f"no {MODEL_INDEX} in the folder")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            try:
                path = Path(hf_hub_download(model, MODEL_INDEX))
            except EntryNotFoundError:
                raise FileNotFoundError(f"no {MODEL_INDEX} in the hub repository") from None
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # ValueError: not a hub id, or not JSON
        raise UserError(
            f"--model: cannot read the {MODEL_INDEX} of {model!r} ({_first_line(error)}). Pass --model with a "
            f"hub id reachable from here or a local folder holding {MODEL_INDEX}, {OFFLINE_HINT}"
        ) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
