"""A full StableDiffusionPipeline (tiny UNet, VAE, CLIP text model and tokenizer, built locally)."""

from __future__ import annotations

import pytest
import torch

import sdmerge
from sdmerge.methods import METHODS
from tests.tiny_diffusers import SD_METHODS, single_thread, tiny_pipeline

pytestmark = pytest.mark.usefixtures(single_thread.__name__)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    """Three DDIM steps with classifier-free guidance (UNet batch 2), 32x32 images, 16x16 latents."""
    return pipe(
        "a photo of a cat",
        num_inference_steps=3,
        height=32,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images


def test_every_method_generates_reproducibly_and_remove_restores(pipe):
    before = generate(pipe)
    processors = dict(pipe.unet.attn_processors)
    for method in SD_METHODS:
        options = {"seed": 0} if METHODS[method].needs_split else {}
        assert sdmerge.apply(pipe, method, r=0.5, **options) is pipe
        first, second = generate(pipe), generate(pipe)
        assert first.shape == before.shape and torch.isfinite(first).all(), method
        assert torch.equal(first, second), method
        assert not torch.equal(first, before), method
    sdmerge.remove(pipe)
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in processors.items())
    assert torch.equal(generate(pipe), before)


def test_batch_without_guidance_and_several_images_per_prompt(pipe):
    """UNet batches of 1 (no guidance) and 6 (3 images per prompt, guided)."""
    sdmerge.apply(pipe, "cis", r=0.5, seed=0)
    try:
        single = generate(pipe, guidance_scale=1.0)
        several = generate(pipe, num_images_per_prompt=3)
    finally:
        sdmerge.remove(pipe)
    assert single.shape[0] == 1 and several.shape[0] == 3
    assert torch.isfinite(single).all() and torch.isfinite(several).all()
    assert not torch.equal(single, generate(pipe, guidance_scale=1.0))
