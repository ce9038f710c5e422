"""The offline miniature (``--preset smoke``): everything the real protocol downloads, made on the spot.

- :func:`build_tiny_pipeline`: a pipeline of each family in :data:`TINY_FAMILIES` at toy widths,
  random weights from a fixed seed, saved to a folder that the sweep then recognises and loads
  with ``from_pretrained`` exactly like a real model (``eval/families.py``):

  - ``sd``: SD-1.5's architecture (UNet with SD-1.5's block layout, 4-level VAE, 2-layer CLIP
    text model, PNDM with SD-1.5's scheduler config, no safety checker);
  - ``sd3``: SD3's (MMDiT of 3 joint blocks with patch 2 and 16 latent channels, two CLIP text
    models with projections, a 2-layer T5 encoder, a VAE without quant convs and SD3's
    scaling/shift factors, flow-matching Euler with shift 3), its VAE one level short (factor 4),
    so that 64x64 pixels make the same 8x8 grid of merged tokens as the tiny UNet's top level;

  CLIP tokenizers are byte-level (the 256 byte symbols), the T5 tokenizer character-level
  (printable ASCII), so every prompt is encoded without unknown tokens; both models make
  64x64 images when called without a size;
- :func:`build_reference_images`: a fake ImageNet validation folder (class-folder layout, JPEG
  files of mixed sizes) that the real reference selection reads;
- :func:`random_features`: a fixed random convolutional network (seeded) standing in for Inception.

Its numbers only check that the machinery runs; they say nothing about image quality or speed.
"""

from __future__ import annotations

import string
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
TOKEN_GRID = 8  # side of the merged blocks' token grid at 64x64 pixels: 64 tokens in both tiny models
TEXT_TOKENS = 77  # the CLIP tokenizers' model_max_length, as the released models
TINY_FAMILIES = ("sd", "sd3")
"""The families of the tiny models, in the order the smoke preset sweeps them."""


def build_tiny_pipeline(folder: Path, family: str) -> None:
    """Save the tiny random-weight pipeline of ``family`` (one of :data:`TINY_FAMILIES`) to
    ``folder`` (atomically; kept if present)."""
    builders = {"sd": _tiny_sd, "sd3": _tiny_sd3}
    if family not in builders:
        raise ValueError(f"no tiny model of family {family!r}; there are: {', '.join(TINY_FAMILIES)}")
    if (folder / "model_index.json").is_file():
        return
    with torch.random.fork_rng():
        torch.manual_seed(SEED)
        pipe = builders[family]()
    write_folder_atomically(folder, pipe.save_pretrained)


def _tiny_sd():
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(tokenizer))
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
    scheduler = PNDMScheduler(  # SD-1.5's scheduler config
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=_vae((8, 8, 16, 16), latent_channels=4),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

    clip_tokenizers = [_clip_tokenizer(), _clip_tokenizer()]
    clip_encoders = [CLIPTextModelWithProjection(_clip_config(t, projection_dim=32)) for t in clip_tokenizers]
    characters = [c for c in string.printable if not c.isspace()]
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]  # \u2581: T5's word start
    t5_vocab += [(c, -3.0) for c in characters] + [("\u2581" + c, -2.5) for c in characters]
    t5 = T5EncoderModel(  # <pad> = 0 and </s> = 1 are T5Config's defaults
        T5Config(vocab_size=len(t5_vocab), d_model=64, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    )
    transformer = SD3Transformer2DModel(
        sample_size=2 * TOKEN_GRID,  # latent side: patch 2
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # the T5 width; the two CLIP widths side by side are padded to it, as in SD3
        caption_projection_dim=32,
        pooled_projection_dim=64,  # the two CLIP projections side by side
        pos_embed_max_size=8 * TOKEN_GRID,  # token grids up to 64x64: images up to 512x512
    )
    vae = _vae(
        (8, 16, 16),
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's scheduler config
        vae=vae,
        text_encoder=clip_encoders[0],
        tokenizer=clip_tokenizers[0],
        text_encoder_2=clip_encoders[1],
        tokenizer_2=clip_tokenizers[1],
        text_encoder_3=t5,
        tokenizer_3=T5Tokenizer(vocab=t5_vocab, extra_ids=0),
    )


def _clip_tokenizer():
    """A byte-level CLIP tokenizer: every byte symbol, alone and at the end of a word; no merges."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab = {}
    for symbol in sorted(ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)  # the same byte at the end of a word
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=TEXT_TOKENS)


def _clip_config(tokenizer, **config):
    """A 2-layer CLIP text model of width 32 for ``tokenizer``; ``config``: more CLIPTextConfig arguments."""
    from transformers import CLIPTextConfig

    vocab = tokenizer.get_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TEXT_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **config,
    )


def _vae(block_out_channels: tuple[int, ...], latent_channels: int, **config):
    """An AutoencoderKL with one level per entry of ``block_out_channels`` (VAE factor 2 ** (levels - 1))."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        sample_size=TOKEN_GRID * 8,
        **config,
    )


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
