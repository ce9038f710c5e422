"""A full StableDiffusionPipeline (tiny UNet, VAE, CLIP text model and tokenizer, built locally)."""

from __future__ import annotations

import pytest
import torch

from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)

import sdmerge
from sdmerge.methods import METHODS
from tests.tiny_diffusers import SD_METHODS, sd15_unet, tiny_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, size=(32, 32), **kwargs):
    """Three DDIM steps with classifier-free guidance (UNet batch 2), 32x32 images, 16x16 latents
    (``size=None``: the pipeline takes the size from its input image)."""
    if size is not None:
        kwargs.update(height=size[0], width=size[1])
    return pipe(
        "a photo of a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs
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


def merged_and_restored(pipe, run, method="cis"):
    """Apply ``method`` (seeded), run twice, remove; check and return (unpatched, merged) outputs."""
    before = run()
    sdmerge.apply(pipe, method, r=0.5, **({"seed": 0} if METHODS[method].needs_split else {}))
    try:
        first, second = run(), run()
    finally:
        sdmerge.remove(pipe)
    assert torch.isfinite(first).all() and torch.equal(first, second)
    assert not torch.equal(first, before)
    assert torch.equal(run(), before)
    return before, first


def test_img2img_and_inpaint_with_strength(pipe):
    """img2img at strength 0.7 (a generation that starts mid-schedule: 2 of 3 steps); inpainting with a
    9-channel UNet on a 9x13 latent (18x26 images: odd and non-square)."""
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(3))
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    _, merged = merged_and_restored(img2img, lambda: generate(img2img, None, image=image, strength=0.7))
    assert merged.shape == (1, 3, 32, 48)

    inpaint = StableDiffusionInpaintPipeline(**{**pipe.components, "unet": sd15_unet(in_channels=9)})
    inpaint.set_progress_bar_config(disable=True)
    image, mask = torch.rand(1, 3, 18, 26), torch.zeros(1, 1, 18, 26)
    mask[..., 4:14, 6:20] = 1
    for method in ("tome", "crucial"):
        _, merged = merged_and_restored(
            inpaint, lambda: generate(inpaint, (18, 26), image=image, mask_image=mask, strength=0.8), method
        )
        assert merged.shape == (1, 3, 18, 26)


def test_controlnet_pipeline_with_guess_mode(pipe):
    """Only the UNet merges; the ControlNet (guess mode: conditional batch only) runs unchanged."""
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    processors = dict(controlnet.attn_processors)
    condition = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for guess_mode in (False, True):
        merged_and_restored(control, lambda: generate(control, image=condition, guess_mode=guess_mode))
    sdmerge.apply(control, "tome")
    assert all(controlnet.attn_processors[name] is p for name, p in processors.items())
    sdmerge.remove(control)


def test_attention_slicing_and_fused_qkv_after_apply_keep_merging(pipe):
    """Each pipeline switch after apply gives what apply after the switch gives: merging stays on."""
    plain = generate(pipe)
    switches = (
        (lambda: pipe.enable_attention_slicing(1), pipe.disable_attention_slicing),
        (pipe.fuse_qkv_projections, pipe.unfuse_qkv_projections),
    )
    try:
        for switch_on, switch_off in switches:
            sdmerge.apply(pipe, "tome", r=0.5, use_rand=False)
            switch_on()
            after = generate(pipe)
            sdmerge.remove(pipe)
            switched_plain = generate(pipe)
            sdmerge.apply(pipe, "tome", r=0.5, use_rand=False)
            assert torch.equal(after, generate(pipe))
            assert not torch.equal(after, switched_plain)
            sdmerge.remove(pipe)
            switch_off()
    finally:
        sdmerge.remove(pipe)
    assert torch.equal(generate(pipe), plain)
