"""Smoke tests of the tiny diffusion-transformer builders (tests/tiny_dit.py): shapes, finiteness and
determinism of the bare transformers and of the pipelines, with odd sizes, batches, CFG and half
precision."""

from functools import partial

import pytest
import torch

from tests.tiny_dit import (
    CLIP_TOKENS,
    PIXART_CALL,
    T5_TOKENS,
    TEXT_DIM,
    flux_inputs,
    flux_transformer,
    pixart_inputs,
    pixart_transformer,
    sd3_inputs,
    sd3_transformer,
    sd35_transformer,
    tiny_flux_img2img_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_img2img_pipeline,
    tiny_sd3_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# name: (builder, inputs, output shape of one sample for a (height, width) latent)
TRANSFORMERS = {
    "sd3": (sd3_transformer, sd3_inputs, lambda h, w: (16, h, w)),
    "sd35": (sd35_transformer, sd3_inputs, lambda h, w: (16, h, w)),
    "pixart": (pixart_transformer, pixart_inputs, lambda h, w: (8, h, w)),
    "pixart-alpha-1024-conditions": (
        partial(pixart_transformer, use_additional_conditions=True),
        partial(pixart_inputs, additional_conditions=True),
        lambda h, w: (8, h, w),
    ),
    "flux-dev": (flux_transformer, flux_inputs, lambda h, w: (h // 2 * (w // 2), 64)),
    "flux-schnell": (
        partial(flux_transformer, guidance_embeds=False),
        partial(flux_inputs, guidance=None),
        lambda h, w: (h // 2 * (w // 2), 64),
    ),
}


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize(("batch", "height", "width"), [(1, 16, 16), (2, 16, 24), (3, 10, 14)])
@torch.no_grad()
def test_transformer_forward(name, batch, height, width):
    """Square, non-square and odd token grids (10x14 latent: 5x7 tokens); two builds and two calls agree."""
    build, inputs, shape = TRANSFORMERS[name]
    out = build()(**inputs(batch, height, width)).sample
    assert out.shape == (batch, *shape(height, width))
    assert torch.isfinite(out).all()
    again = build()(**inputs(batch, height, width)).sample
    assert torch.equal(out, again)
    other_seed = build(seed=1)(**inputs(batch, height, width)).sample
    assert not torch.allclose(out, other_seed)


def test_layouts():
    """The block layouts the merging integration will meet."""
    sd3 = sd3_transformer()
    assert [block.context_pre_only for block in sd3.transformer_blocks] == [False, False, True]
    assert all(block.attn2 is None for block in sd3.transformer_blocks)
    sd35 = sd35_transformer()
    assert [block.attn2 is not None for block in sd35.transformer_blocks] == [True, False, False]
    assert sd35.transformer_blocks[0].attn.norm_q is not None
    pixart = pixart_transformer()
    assert all(block.norm_type == "ada_norm_single" for block in pixart.transformer_blocks)
    assert pixart.transformer_blocks[0].attn2.is_cross_attention
    assert not pixart.use_additional_conditions and pixart.pos_embed.interpolation_scale == 1
    flux = flux_transformer()
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (1, 2)
    assert sum(flux.config.axes_dims_rope) == flux.config.attention_head_dim


def test_flux_inputs_match_the_pipeline_packing():
    """Token t of the packed latent is grid cell (t // (w/2), t % (w/2)), as img_ids say."""
    inputs = flux_inputs(batch=1, height=6, width=10)
    assert inputs["hidden_states"].shape == (1, 15, 64)
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
    assert torch.equal(inputs["img_ids"][:, 1:], torch.stack([rows.flatten(), cols.flatten()], 1))
    assert inputs["txt_ids"].shape == (12, 3) and not inputs["txt_ids"].any()
    with pytest.raises(ValueError, match="even"):
        flux_inputs(height=7)


@torch.no_grad()
def test_sd3_latent_not_a_multiple_of_the_patch_is_cropped():
    """diffusers floors the token grid (PatchEmbed's strided conv) and the output loses the odd row and
    column; the SD3 pipelines refuse such sizes (height and width must divide by 8 * patch_size)."""
    out = sd3_transformer()(**sd3_inputs(1, 15, 17)).sample
    assert out.shape == (1, 16, 14, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sd3", "sd35", "pixart", "flux-dev"])
@torch.no_grad()
def test_half_precision_forward_on_cpu(name, dtype):
    build, inputs, _ = TRANSFORMERS[name]
    reference = build()(**inputs()).sample
    model = build().half() if dtype == torch.float16 else build().bfloat16()
    half_inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs().items()}
    out = model(**half_inputs).sample
    assert out.dtype == dtype and torch.isfinite(out).all()
    tolerance = 0.02 if dtype == torch.float16 else 0.15
    assert (out.float() - reference).abs().max() <= tolerance * reference.abs().max()


# --------------------------------------------------------------------------------------------------
# Pipelines

SD3_CALL = {"max_sequence_length": T5_TOKENS}
PIPELINES = {
    "sd3": (tiny_sd3_pipeline, SD3_CALL),
    "sd3-without-t5": (partial(tiny_sd3_pipeline, t5=False), SD3_CALL),
    "pixart-sigma": (tiny_pixart_pipeline, {**PIXART_CALL, "max_sequence_length": T5_TOKENS}),
    "pixart-alpha": (partial(tiny_pixart_pipeline, sigma=False), {**PIXART_CALL, "max_sequence_length": T5_TOKENS}),
    "flux-dev": (tiny_flux_pipeline, {"max_sequence_length": T5_TOKENS}),
    "flux-schnell": (partial(tiny_flux_pipeline, guidance_embeds=False), {"max_sequence_length": T5_TOKENS}),
    "sd3-img2img": (tiny_sd3_img2img_pipeline, {**SD3_CALL, "image": torch.rand(1, 3, 32, 32), "strength": 0.9}),
    "flux-img2img": (
        tiny_flux_img2img_pipeline,
        {"max_sequence_length": T5_TOKENS, "image": torch.rand(1, 3, 32, 32), "strength": 0.9},
    ),
}


def generate(pipe, seed=0, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    defaults = {"prompt": "a cat", "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "pt"}
    return pipe(generator=torch.Generator().manual_seed(seed), **{**defaults, **kwargs}).images


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_end_to_end(name):
    build, call = PIPELINES[name]
    pipe = build()
    images = generate(pipe, **call)
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all() and images.std() > 0
    assert torch.equal(images, generate(pipe, **call))
    assert not torch.equal(images, generate(pipe, seed=1, **call))


def record_transformer_calls(pipe):
    """Shapes of (hidden_states, encoder_hidden_states) at every transformer call (kwargs or positional)."""
    calls = []

    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        calls.append((tuple(hidden.shape), tuple(kwargs["encoder_hidden_states"].shape)))

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


@pytest.mark.parametrize(
    ("name", "guidance", "latent", "text"),
    [
        # CFG doubles the batch: 2 prompts x 2 images x 2; 32x48 px -> 16x24 latent -> 8x12 tokens
        ("sd3", {"guidance_scale": 5.0}, (8, 16, 16, 24), (8, CLIP_TOKENS + T5_TOKENS, TEXT_DIM)),
        ("pixart-sigma", {"guidance_scale": 4.5}, (8, 4, 16, 24), (8, T5_TOKENS, TEXT_DIM)),
        # Flux: guidance is an embedding, no doubling; packed tokens
        ("flux-dev", {"guidance_scale": 3.5}, (4, 96, 64), (4, T5_TOKENS, TEXT_DIM)),
    ],
)
def test_pipeline_batch_guidance_non_square(name, guidance, latent, text):
    build, call = PIPELINES[name]
    pipe = build()
    calls = record_transformer_calls(pipe)
    kwargs = {**call, **guidance, "prompt": ["a cat", "a dog"], "num_images_per_prompt": 2, "height": 32, "width": 48}
    images = generate(pipe, **kwargs)
    assert images.shape == (4, 3, 32, 48) and torch.isfinite(images).all()
    assert calls == [(latent, text)] * 2
    assert torch.equal(images, generate(pipe, **kwargs))


def test_flux_true_cfg_runs_the_transformer_twice_per_step():
    pipe = tiny_flux_pipeline()
    calls = record_transformer_calls(pipe)
    images = generate(pipe, negative_prompt="blurry", true_cfg_scale=2.0, max_sequence_length=T5_TOKENS)
    assert images.shape == (1, 3, 32, 32) and len(calls) == 4


@pytest.mark.parametrize(
    ("name", "shape"),
    [("sd3", (1, 16, 16, 24)), ("pixart-sigma", (1, 4, 16, 24)), ("flux-dev", (1, 96, 64))],
)
def test_pipeline_latent_output(name, shape):
    """output_type="latent": SD3 and PixArt return [B, C, h, w]; Flux returns its packed tokens."""
    build, call = PIPELINES[name]
    latents = generate(build(), output_type="latent", height=32, width=48, **call)
    assert latents.shape == shape and torch.isfinite(latents).all()
