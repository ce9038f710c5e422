"""The offline miniature (``--preset smoke``): everything the real protocol downloads, made on the spot.

- :func:`build_tiny_pipeline`: a Stable Diffusion pipeline with SD-1.5's architecture at toy
  widths (UNet with SD-1.5's block layout, 4-level VAE, 2-layer CLIP text model, a byte-level
  CLIP tokenizer whose vocabulary is the 256 byte symbols, PNDM with SD-1.5's scheduler
  config, no safety checker), random weights from a fixed seed, saved to a folder that the
  sweep then loads with ``from_pretrained`` exactly like a real model;
- :func:`build_reference_images`: a fake ImageNet validation folder (class-folder layout, JPEG
  files of mixed sizes) that the real reference selection reads;
- :func:`random_features`: a fixed random convolutional network (seeded) standing in for Inception.

Its numbers only check that the machinery runs; they say nothing about image quality or speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from .atomic import write_folder_atomically
from .fid import FeatureExtractor

SEED = 0
TOKEN_GRID = 8  # latent side at 64x64 pixels (VAE factor 8): 64 tokens in the top-level attention blocks


def build_tiny_pipeline(folder: Path) -> None:
    """Save a tiny random-weight SD-1.5-shaped pipeline to ``folder`` (atomically; kept if present)."""
    if (folder / "model_index.json").is_file():
        return
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)  # the same byte at the end of a word
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=64,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=77,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
        unet = UNet2DConditionModel(
            sample_size=TOKEN_GRID,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            sample_size=TOKEN_GRID * 8,
        )
    scheduler = PNDMScheduler(  # SD-1.5's scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    write_folder_atomically(folder, pipe.save_pretrained)


def build_reference_images(folder: Path, wnids: Sequence[str], per_class: int) -> None:
    """Write ``per_class`` JPEGs to ``folder/<wnid>/`` for every wnid whose folder is missing
    (each class folder atomically; its images depend only on the wnid).

    Each image is smooth random colour (a seeded 4x4 pattern upsampled), 64x48 or 48x64 pixels
    in turn, like ImageNet's mix of landscape and portrait photos.
    """
    for wnid in wnids:
        if (folder / wnid).is_dir():
            continue

        def write(tmp: Path, wnid: str = wnid) -> None:
            rng = np.random.default_rng([SEED, int(wnid[1:])])
            for j in range(per_class):
                size = (48, 64) if j % 2 else (64, 48)
                coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 4, 4)))
                image = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False).clamp(0, 255)
                array = image[0].permute(1, 2, 0).round().byte().numpy()
                Image.fromarray(array).save(tmp / f"ILSVRC2012_val_{j:08d}.JPEG", quality=90)

        write_folder_atomically(folder / wnid, write)


class RandomConvFeatures(nn.Module):
    """uint8 ``[B, 3, H, W]`` -> float ``[B, 64]``: resize to 64x64 (bilinear, antialias), scale to
    [-1, 1], three seeded random 3x3 convolutions (stride 2, ReLU; He-initialised, so features
    keep the input's scale and FIDs are of order 1), global average pooling."""

    def __init__(self, dims: int = 64, seed: int = SEED):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.layers = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2),
                nn.ReLU(),
                nn.Conv2d(32, dims, 3, stride=2),
                nn.ReLU(),
            )
            for layer in self.layers[::2]:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(64, 64), mode="bilinear", antialias=True, align_corners=False)
        return self.layers((x - 128) / 128).mean(dim=(2, 3))


def random_features() -> FeatureExtractor:
    """The smoke preset's stand-in for Inception, described as such in every result."""
    identity = {
        "name": f"smoke preset: random conv net (seed {SEED}), NOT Inception",
        "dims": 64,
        "resize": "whole image resized to 64x64, bilinear, antialias=True (aspect ratio not kept); float32",
    }
    return FeatureExtractor(RandomConvFeatures(), identity)
