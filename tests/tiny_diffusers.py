"""Tiny diffusers models built from configs (random weights, no downloads) for the SD tests."""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdmerge.methods import METHODS

SD_METHODS = tuple(name for name, method in METHODS.items() if "sd" in method.models)
CONTEXT_DIM = 32  # cross-attention width = the text encoder's hidden size
SD15_MERGED = (  # the transformer blocks SD-1.5's layout merges by default, as tomesd
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "down_blocks.0.attentions.1.transformer_blocks.0",
    "up_blocks.3.attentions.0.transformer_blocks.0",
    "up_blocks.3.attentions.1.transformer_blocks.0",
    "up_blocks.3.attentions.2.transformer_blocks.0",
)


def sd15_unet(seed: int = 0, sample_size: int = 16, **config) -> UNet2DConditionModel:
    """SD-1.5's block layout (4 levels, attention at the top three, 2 blocks down / 3 up) at tiny
    widths; ``config`` overrides UNet2DConditionModel arguments (e.g. ``in_channels=9`` for inpainting)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **{
            "sample_size": sample_size,
            "block_out_channels": (32, 64, 64, 64),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": CONTEXT_DIM,
            "attention_head_dim": 4,
            "layers_per_block": 2,
            "norm_num_groups": 32,
            **config,
        }
    ).eval()


def two_level_unet(seed: int = 0, **config) -> UNet2DConditionModel:
    """The smallest UNet with attention at two levels (one block each way per level): for
    torch.compile tests, whose tracing time grows with the number of modules."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        **{
            "sample_size": 8,
            "block_out_channels": (32, 32),
            "down_block_types": ("CrossAttnDownBlock2D",) * 2,
            "up_block_types": ("CrossAttnUpBlock2D",) * 2,
            "cross_attention_dim": CONTEXT_DIM,
            "attention_head_dim": 4,
            "layers_per_block": 1,
            "norm_num_groups": 32,
            **config,
        }
    ).eval()


def sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's block layout (no attention at the top level, text_time conditioning) at tiny widths."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=CONTEXT_DIM + 6 * 8,
        cross_attention_dim=CONTEXT_DIM,
        layers_per_block=2,
        norm_num_groups=32,
    ).eval()


def unet_inputs(batch: int = 2, size: int | tuple[int, int] = 16, prompt_tokens: int = 7, seed: int = 1):
    """``(sample [B, 4, H, W], prompt embeddings [B, T, CONTEXT_DIM])``; ``size``: ``H = W`` or ``(H, W)``."""
    generator = torch.Generator().manual_seed(seed)
    height, width = (size, size) if isinstance(size, int) else size
    sample = torch.randn(batch, 4, height, width, generator=generator)
    context = torch.randn(batch, prompt_tokens, CONTEXT_DIM, generator=generator)
    return sample, context


def sdxl_conditions(batch: int = 2, seed: int = 2) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "text_embeds": torch.randn(batch, CONTEXT_DIM, generator=generator),
        "time_ids": torch.rand(batch, 6, generator=generator),
    }


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A full StableDiffusionPipeline: tiny SD-1.5-layout UNet, 2-level VAE (latents of half the
    image size), 2-layer CLIP text model and a character-level CLIP tokenizer."""
    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in letters + [letter + "</w>" for letter in letters]:
        vocab[token] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=CONTEXT_DIM,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
    ).eval()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=sd15_unet(seed),
        scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
