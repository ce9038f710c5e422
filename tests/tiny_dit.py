"""Tiny diffusion transformers and pipelines (SD3 / SD3.5, PixArt-alpha/sigma, Flux) built from configs:
random weights, no downloads, forward passes in milliseconds on a CPU.

The layouts follow diffusers' own fast tests (tiny widths, the real block classes and the real
patch/packing), with a few choices closer to the released models: SD3 keeps ``patch_size=2`` and 16
latent channels, Flux keeps 64 packed input channels (16 latent channels x 2x2), PixArt keeps the
learned-sigma output (``out_channels = 2 * in_channels``). Text encoders are 2-layer CLIP / T5 models
with character-level tokenizers built in memory.

The ``*_inputs`` helpers take the size of the VAE latent (``height x width``), as the pipelines do:
SD3 and PixArt see ``(height / 2) * (width / 2)`` image tokens (patch 2), Flux packs 2x2 latent
pixels into one token, so the same count. Pipelines need ``height`` and ``width`` in pixels divisible
by 4 (VAE factor 2 x patch/packing 2).
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from sdmerge.methods import METHODS

TEXT_DIM = 32  # hidden size of every tiny text encoder (CLIP and T5) = the transformers' text input width
CLIP_TOKENS = 16  # the CLIP tokenizers' model_max_length (77 in the released models)
T5_TOKENS = 16  # max_sequence_length the pipelines are called with (SD3: 256, PixArt: 300/120, Flux: 512)
SD3_LATENT_CHANNELS = 16
SD3_POOLED_DIM = 2 * TEXT_DIM  # SD3 concatenates the pooled outputs of its two CLIP encoders
PIXART_LATENT_CHANNELS = 4
FLUX_LATENT_CHANNELS = 16  # FluxTransformer2DModel.in_channels = 4 * this (2x2 packing)
PIXART_CALL = {"use_resolution_binning": False, "clean_caption": False}
"""Keyword arguments every tiny PixArt pipeline call needs: resolution binning only knows the released
sample sizes (32/64/128/256), and caption cleaning wants bs4 + ftfy (it warns and turns itself off)."""


# --------------------------------------------------------------------------------------------------
# Bare transformers and their forward inputs


def seeded(method: str, **options) -> dict:
    """``options`` with ``seed=0`` for the methods whose split is random (bipartite matching)."""
    return {**({"seed": 0} if METHODS[method].needs_split else {}), **options}


def run(model, inputs: dict, t: float | None = None) -> torch.Tensor:
    """One call of a bare transformer (``t``: a timestep for every sample instead of the inputs')."""
    if t is not None:
        inputs = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
    with torch.no_grad():
        return model(**inputs).sample


def sd3_transformer(seed: int = 0, dual_attention_layers: tuple[int, ...] = (), **config) -> SD3Transformer2DModel:
    """SD3's MMDiT at tiny width: 3 JointTransformerBlocks (the last one ``context_pre_only``), 4 heads of
    8 channels, patch 2, 16 latent channels. ``dual_attention_layers=(0,)`` gives the SD3.5-Medium
    layout (an extra image-only ``attn2`` in those blocks; pass ``qk_norm="rms_norm"`` too, or use
    :func:`sd35_transformer`). ``config`` overrides SD3Transformer2DModel arguments."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        **{
            "sample_size": 16,  # only the pipeline's default latent size (the pos-embedding is cropped)
            "patch_size": 2,
            "in_channels": SD3_LATENT_CHANNELS,
            "out_channels": SD3_LATENT_CHANNELS,
            "num_layers": 3,
            "attention_head_dim": 8,
            "num_attention_heads": 4,
            "joint_attention_dim": TEXT_DIM,
            "caption_projection_dim": 32,  # must equal num_attention_heads * attention_head_dim
            "pooled_projection_dim": SD3_POOLED_DIM,
            "pos_embed_max_size": 24,  # token grids up to 24x24 = latents up to 48x48 (SD3-Medium: 192)
            "dual_attention_layers": tuple(dual_attention_layers),
            **config,
        }
    ).eval()


def sd35_transformer(seed: int = 0, **config) -> SD3Transformer2DModel:
    """SD3.5-Medium's layout at tiny width: RMSNorm qk-norm and dual attention in the first block
    (the released model has it in blocks 0-12 of 24)."""
    return sd3_transformer(seed, **{"dual_attention_layers": (0,), "qk_norm": "rms_norm", **config})


def sd3_inputs(batch: int = 2, height: int = 16, width: int = 16, text_tokens: int = 12, seed: int = 1) -> dict:
    """Forward kwargs of :func:`sd3_transformer`: ``hidden_states [B, 16, height, width]`` (a latent),
    ``encoder_hidden_states [B, text_tokens, TEXT_DIM]``, ``pooled_projections [B, 64]`` and
    ``timestep [B]`` in [0, 1000) as FlowMatchEulerDiscreteScheduler gives them."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, SD3_LATENT_CHANNELS, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_tokens, TEXT_DIM, generator=generator),
        "pooled_projections": torch.randn(batch, SD3_POOLED_DIM, generator=generator),
        "timestep": torch.rand(batch, generator=generator) * 1000,
    }


def pixart_transformer(seed: int = 0, **config) -> PixArtTransformer2DModel:
    """PixArt's DiT at tiny width: 2 BasicTransformerBlocks with ``norm_type="ada_norm_single"``
    (self-attention, cross-attention to the caption, feed-forward), 3 heads of 8 channels (the width
    must be divisible by 3 for ``use_additional_conditions``), patch 2, 4 latent channels, learned
    sigma (8 output channels). ``sample_size=16`` leaves ``use_additional_conditions`` off (diffusers
    turns it on only for ``sample_size=128``, PixArt-alpha 1024; PixArt-sigma configs set it False) and
    ``interpolation_scale = max(sample_size // 64, 1) = 1``. ``config`` overrides
    PixArtTransformer2DModel arguments, e.g. ``use_additional_conditions=True``."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        **{
            "sample_size": 16,
            "num_layers": 2,
            "patch_size": 2,
            "attention_head_dim": 8,
            "num_attention_heads": 3,
            "in_channels": PIXART_LATENT_CHANNELS,
            "out_channels": 2 * PIXART_LATENT_CHANNELS,
            "caption_channels": TEXT_DIM,
            "cross_attention_dim": 24,  # = num_attention_heads * attention_head_dim
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
            **config,
        }
    ).eval()


def pixart_inputs(
    batch: int = 2,
    height: int = 16,
    width: int = 16,
    text_tokens: int = 12,
    seed: int = 1,
    additional_conditions: bool = False,
    padded_text_tokens: int = 3,
) -> dict:
    """Forward kwargs of :func:`pixart_transformer`, as the PixArt pipelines pass them:
    ``hidden_states [B, 4, height, width]``, ``encoder_hidden_states [B, text_tokens, TEXT_DIM]`` (T5
    output, projected inside the model), ``encoder_attention_mask [B, text_tokens]`` (1 = keep; the
    last ``padded_text_tokens`` are padding), integer ``timestep [B]`` and ``added_cond_kwargs``
    (``resolution [B, 2]`` and ``aspect_ratio [B, 1]`` in pixels when ``additional_conditions``, as the
    alpha pipeline at sample size 128 passes them, else both None)."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    if padded_text_tokens:
        mask[:, -padded_text_tokens:] = 0
    if additional_conditions:
        pixels = torch.tensor([8.0 * height, 8.0 * width])
        added = {"resolution": pixels.repeat(batch, 1), "aspect_ratio": torch.tensor([[height / width]] * batch)}
    else:
        added = {"resolution": None, "aspect_ratio": None}
    return {
        "hidden_states": torch.randn(batch, PIXART_LATENT_CHANNELS, height, width, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_tokens, TEXT_DIM, generator=generator),
        "encoder_attention_mask": mask,
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "added_cond_kwargs": added,
    }


def flux_transformer(seed: int = 0, guidance_embeds: bool = True, **config) -> FluxTransformer2DModel:
    """Flux's transformer at tiny width: 1 double-stream FluxTransformerBlock and 2 single-stream
    FluxSingleTransformerBlocks, 2 heads of 16 channels, rotary axes (4, 6, 6) (sum = head dim; Flux:
    16 + 56 + 56 = 128), 64 packed input channels. ``guidance_embeds=True`` is FLUX.1-dev (guidance
    distilled; the forward then needs ``guidance``), False is FLUX.1-schnell. ``config`` overrides
    FluxTransformer2DModel arguments (``num_layers``, ``num_single_layers``...)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        **{
            "patch_size": 1,
            "in_channels": 4 * FLUX_LATENT_CHANNELS,
            "num_layers": 1,
            "num_single_layers": 2,
            "attention_head_dim": 16,
            "num_attention_heads": 2,
            "joint_attention_dim": TEXT_DIM,
            "pooled_projection_dim": TEXT_DIM,
            "guidance_embeds": guidance_embeds,
            "axes_dims_rope": (4, 6, 6),
            **config,
        }
    ).eval()


def flux_inputs(
    batch: int = 2,
    height: int = 16,
    width: int = 16,
    text_tokens: int = 12,
    seed: int = 1,
    guidance: float | None = 3.5,
) -> dict:
    """Forward kwargs of :func:`flux_transformer`, built as FluxPipeline builds them: a latent
    ``[B, 16, height, width]`` (both even) packed into ``hidden_states [B, height/2 * width/2, 64]``
    (row-major over the token grid), ``img_ids [N, 3]`` = (0, row, col), ``txt_ids [text_tokens, 3]``
    = zeros, ``encoder_hidden_states [B, text_tokens, TEXT_DIM]``, ``pooled_projections [B, TEXT_DIM]``,
    ``timestep [B]`` in [0, 1) (sigmas; the model multiplies by 1000) and ``guidance [B]`` (pass
    ``guidance=None`` for a model built with ``guidance_embeds=False``)."""
    if height % 2 or width % 2:
        raise ValueError(f"Flux packs 2x2 latent pixels per token: height and width must be even, got {height}x{width}")
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, FLUX_LATENT_CHANNELS, height, width, generator=generator)
    inputs = {
        "hidden_states": FluxPipeline._pack_latents(latent, batch, FLUX_LATENT_CHANNELS, height, width),
        "encoder_hidden_states": torch.randn(batch, text_tokens, TEXT_DIM, generator=generator),
        "pooled_projections": torch.randn(batch, TEXT_DIM, generator=generator),
        "timestep": torch.rand(batch, generator=generator),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    if guidance is not None:
        inputs["guidance"] = torch.full((batch,), float(guidance))
    return inputs


# --------------------------------------------------------------------------------------------------
# Text encoders, tokenizers, VAEs


def clip_tokenizer(max_length: int = CLIP_TOKENS) -> CLIPTokenizer:
    """A character-level CLIP tokenizer (no merges) over lowercase letters, built in memory."""
    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [letter + "</w>" for letter in letters]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int = T5_TOKENS) -> T5Tokenizer:
    """A character-level T5 (Unigram) tokenizer built in memory: <pad>=0, </s>=1, <unk>=2, the word
    boundary "▁", letters with and without it; no sentinel tokens. Characters outside a-z map to <unk>."""
    letters = list(string.ascii_lowercase)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(letter, -3.0) for letter in letters] + [("\u2581" + letter, -2.5) for letter in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_encoder(seed: int, projection: bool, vocab_size: int) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A 2-layer CLIP text model of width TEXT_DIM (with a TEXT_DIM projection for SD3's encoders)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_TOKENS,
        projection_dim=TEXT_DIM,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def t5_text_encoder(seed: int, vocab_size: int) -> T5EncoderModel:
    """A 2-layer T5 encoder of width TEXT_DIM."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_vae(latent_channels: int, seed: int = 0, **config) -> AutoencoderKL:
    """A 2-level AutoencoderKL (latents of half the image size, so ``vae_scale_factor = 2``)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        **{
            "in_channels": 3,
            "out_channels": 3,
            "block_out_channels": (8, 8),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "latent_channels": latent_channels,
            "norm_num_groups": 8,
            "layers_per_block": 1,
            **config,
        }
    ).eval()


# --------------------------------------------------------------------------------------------------
# Pipelines


def tiny_sd3_pipeline(seed: int = 0, t5: bool = True, transformer: SD3Transformer2DModel | None = None):
    """StableDiffusion3Pipeline: :func:`sd3_transformer` (or ``transformer``), two CLIP text models
    with projection, a T5 encoder (``t5=False``: none; SD3 then feeds zeros of
    ``max_sequence_length`` tokens instead), the SD3 VAE layout without quant convs, and
    FlowMatchEulerDiscreteScheduler. The text sequence is CLIP_TOKENS + max_sequence_length tokens
    (CLIP first). Call it with ``max_sequence_length=T5_TOKENS`` (its default is 256) and e.g.
    ``height=width=32, num_inference_steps=2``."""
    tokenizer = clip_tokenizer()
    t5_tok = t5_tokenizer() if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer if transformer is not None else sd3_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(
            SD3_LATENT_CHANNELS,
            seed,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ),
        text_encoder=clip_text_encoder(seed, projection=True, vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(seed + 1, projection=True, vocab_size=len(tokenizer)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_text_encoder(seed, len(t5_tok)) if t5 else None,
        tokenizer_3=t5_tok,
    )


def tiny_sd3_img2img_pipeline(pipe: StableDiffusion3Pipeline | None = None) -> StableDiffusion3Img2ImgPipeline:
    """StableDiffusion3Img2ImgPipeline sharing the components of ``pipe`` (default: a fresh
    :func:`tiny_sd3_pipeline`). Call with ``image`` of e.g. 32x32 pixels and ``strength``."""
    return StableDiffusion3Img2ImgPipeline.from_pipe(pipe if pipe is not None else tiny_sd3_pipeline())


def tiny_pixart_pipeline(seed: int = 0, sigma: bool = True, transformer: PixArtTransformer2DModel | None = None):
    """PixArtSigmaPipeline (``sigma=False``: PixArtAlphaPipeline): :func:`pixart_transformer` (or
    ``transformer``), a T5 encoder, an SD-style VAE with 4 latent channels and DDIMScheduler (the
    released models ship DPMSolverMultistepScheduler). Call with ``**PIXART_CALL``,
    ``max_sequence_length=T5_TOKENS`` and e.g. ``height=width=32, num_inference_steps=2``."""
    tokenizer = t5_tokenizer()
    pipeline_class = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    return pipeline_class(
        tokenizer=tokenizer,
        text_encoder=t5_text_encoder(seed, len(tokenizer)),
        vae=tiny_vae(PIXART_LATENT_CHANNELS, seed),
        transformer=transformer if transformer is not None else pixart_transformer(seed),
        scheduler=DDIMScheduler(),
    )


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True, transformer: FluxTransformer2DModel | None = None):
    """FluxPipeline: :func:`flux_transformer` (or ``transformer``), a CLIP text model (pooled output),
    a T5 encoder (the sequence), the Flux VAE layout (16 latent channels, no quant convs) and
    FlowMatchEulerDiscreteScheduler with Flux's dynamic shifting. Call with
    ``max_sequence_length=T5_TOKENS`` (default 512) and e.g. ``height=width=32, num_inference_steps=2``;
    ``guidance_scale`` feeds the guidance embedding (no batch doubling); ``true_cfg_scale > 1`` with a
    ``negative_prompt`` runs the transformer twice per step."""
    tokenizer = clip_tokenizer()
    t5_tok = t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=tiny_vae(
            FLUX_LATENT_CHANNELS,
            seed,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.1159,
            scaling_factor=0.3611,
        ),
        text_encoder=clip_text_encoder(seed, projection=False, vocab_size=len(tokenizer)),
        tokenizer=tokenizer,
        text_encoder_2=t5_text_encoder(seed, len(t5_tok)),
        tokenizer_2=t5_tok,
        transformer=transformer if transformer is not None else flux_transformer(seed, guidance_embeds),
    )


def tiny_flux_img2img_pipeline(pipe: FluxPipeline | None = None) -> FluxImg2ImgPipeline:
    """FluxImg2ImgPipeline sharing the components of ``pipe`` (default: a fresh :func:`tiny_flux_pipeline`)."""
    return FluxImg2ImgPipeline.from_pipe(pipe if pipe is not None else tiny_flux_pipeline())
