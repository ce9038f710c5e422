"""The Flux layout: FLUX.1 ``FluxTransformer2DModel`` (its double-stream and single-stream blocks).

Flux differs from SD3 in two ways that matter for merging:

- **Rotary positions.** No position is added to the tokens: ``FluxPosEmbed`` turns the prompt's and
  the image's token ids (``txt_ids [T, 3]``, ``img_ids [N, 3]``: ``(0, row, column)``) into a
  ``(cos, sin)`` table ``[T + N, D]`` that the attention applies to queries and keys (prompt first).
  A merged token is given the rotation of its group's **mean position**: its ids merged with the
  group's weights (the mean id of its tokens, or their weighted mean for ``cis`` / ``crucial``),
  turned into ``(cos, sin)`` by the model's own ``FluxPosEmbed``. Rotary angles are linear in the
  ids (``angle = id * theta ** (-2 i / d)``), so a fractional mean id is a valid rotation (the
  mean of the rotations would not be). Plans are per sample, so the merged tokens' positions
  differ per sample: sdmerge runs a merged attention itself
  (:func:`attention_on_merged_tokens`: the arithmetic of diffusers' ``FluxAttnProcessor`` with a
  rotation per sample), still through diffusers' attention dispatch
  (``dispatch_attention_fn`` with the processor's backend and parallel config), so
  ``set_attention_backend`` keeps working.
- **Single-stream blocks.** ``FluxSingleTransformerBlock`` concatenates the prompt's and the
  image's tokens, normalises them, runs the attention and the MLP's input projection on the same
  normed sequence, projects both back with one ``proj_out`` and adds the residual. Its plan is made
  at the norm's output (which runs first). With ``merge_attn`` and ``merge_mlp`` the whole body runs
  merged: the image part is merged after the norm and unmerged after ``proj_out``, before the gate
  and the residual, so every token keeps its own residual (where a diffusers cache hooks the norm,
  the attention or the MLP, each of them and ``proj_out`` merge and unmerge on their own instead:
  a cache must keep every token). With ``merge_attn`` alone only the attention runs merged (its
  output unmerged before ``proj_out``); with ``merge_mlp`` alone, the MLP's input projection.

Double-stream blocks merge as SD3's joint blocks: the image tokens of the joint attention (the
prompt's tokens never), and the image feed-forward with ``merge_mlp``. ``cis`` / ``crucial``: the
attention the prompt's tokens pay to each image token in the same call, with the rotary positions
(:func:`joint_attention_mass`). Which blocks: ``blocks`` indexes the double-stream blocks and then
the single-stream ones (FLUX.1: 0 .. 18, then 19 .. 56); by default all but the first and the last.

The token grid (for ``tome`` / ``cis``'s split and ``grid``'s windows) is read from ``img_ids`` on
the host once per ids tensor (a pipeline passes the same one at every step) and kept on it; a
sequence that is not one raster grid (Kontext's reference image tokens) has none, and those
methods then raise.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import Tensor, nn

from ..config import MergeConfig
from ..layout import Argument, AttentionTokens, BlockSite, Branch, Layout, PromptMass, Span, held, uncompiled
from ..prompt_importance import prompt_mass_on_image
from .dit import transformer_layout

SUPPORTED = (
    "FluxPipeline (and img2img / inpaint / fill / Kontext / Control / ControlNet), FluxTransformer2DModel "
    "(torch.compile'd or not)"
)

FAMILY = "Flux"
HIDDEN_STATES = Argument("hidden_states", 0)
IMAGE_IDS = Argument("img_ids", 4)  # FluxTransformer2DModel.forward's 5th and 6th arguments
TEXT_IDS = Argument("txt_ids", 5)
MODEL_KWARGS = Argument("joint_attention_kwargs", 7)  # FluxTransformer2DModel.forward's 8th argument
BLOCK_KWARGS = Argument("joint_attention_kwargs", 4)  # both block kinds' 5th (checkpointing passes all)
GRID = "_sdmerge_grid"  # the attribute of an img_ids tensor that keeps its token grid


def find(model) -> FluxTransformer2DModel | None:
    """``model`` or ``model.transformer`` as a FluxTransformer2DModel (compiled or not), else ``None``."""
    return held(model, "transformer", FluxTransformer2DModel)


def why_unsupported(model) -> str | None:
    """A Flux ControlNet (left unmerged) or a FLUX.2 transformer (another layout)."""
    name = type(uncompiled(model)).__name__
    component = type(uncompiled(getattr(model, "transformer", None))).__name__
    if name in ("FluxControlNetModel", "FluxMultiControlNetModel"):
        return (
            f"{name} is a ControlNet, which sdmerge leaves unmerged: it merges tokens in the pipeline's transformer "
            "only. Pass the pipeline or its transformer: sdmerge.apply(pipe)"
        )
    if "Flux2Transformer2DModel" in (name, component):
        return (
            "FLUX.2 (Flux2Transformer2DModel) is not supported: its single-stream blocks take the prompt and the "
            "image as one sequence whose split the blocks are not told, and its modulation is computed once for all "
            "blocks; FLUX.1 (FluxTransformer2DModel) is"
        )
    return None


def _ids(value: Tensor) -> Tensor:
    """Token ids as ``[S, 3]`` (diffusers still accepts, and takes the first of, a batch of them)."""
    return value[0] if value.dim() == 3 else value


def token_grid(args: tuple, kwargs: dict) -> tuple[int, int] | None:
    """``(H, W)`` of the image tokens' raster grid, from ``img_ids`` ``[N, 3]`` = ``(0, row, column)``;
    ``None`` when they are not one raster grid. Read on the host once per ids tensor and kept on it."""
    ids = _ids(IMAGE_IDS.get(args, kwargs))
    grid = getattr(ids, GRID, False)
    if grid is False:
        grid = None
        rows, columns = ids[:, 1].long(), ids[:, 2].long()
        height, width = int(rows.max()) + 1, int(columns.max()) + 1
        if height * width == ids.shape[0] and bool((ids[:, 0] == ids[0, 0]).all()):
            raster = torch.arange(height * width, device=ids.device)
            if torch.equal(rows * width + columns, raster):
                grid = (height, width)
        setattr(ids, GRID, grid)
    return grid


def token_ids(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    """``(txt_ids [T, 3], img_ids [N, 3])`` of a model call: what places its tokens."""
    return _ids(TEXT_IDS.get(args, kwargs)), _ids(IMAGE_IDS.get(args, kwargs))


def _rotated(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of ``x`` ``[B, S, H, D]`` with a table per sample ``cos``, ``sin`` ``[B or 1, S, D]``:
    the arithmetic of diffusers' ``apply_rotary_emb`` (``use_real``, pairs of channels), whose
    table has no batch dimension."""
    cos, sin = cos[:, :, None, :].to(x.device), sin[:, :, None, :].to(x.device)
    real, imaginary = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    turned = torch.stack([-imaginary, real], dim=-1).flatten(3)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def _merged_rotation(pos_embed: nn.Module, tokens: AttentionTokens) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` ``[B, M, D]`` of the merged image tokens: the rotation of each group's mean
    position (its tokens' ids merged with the plan's weights)."""
    _, image_ids = tokens.call.positions
    B, N = tokens.plan.labels.shape
    merged = tokens.plan.merge(image_ids.float().expand(B, N, -1), tokens.weights)  # [B, M, 3]
    cos, sin = pos_embed(merged.reshape(-1, merged.shape[-1]))
    return cos.view(B, -1, cos.shape[-1]), sin.view(B, -1, sin.shape[-1])


def attention_on_merged_tokens(pos_embed: nn.Module, attn, args: tuple, kwargs: dict, tokens: AttentionTokens):
    """A Flux attention on merged image tokens: queries of the prompt's tokens and of
    ``tokens.queries`` ``[B, Nq, C]`` (merged, or every token with ``kv_only``), keys and values of
    the prompt's and of the merged tokens ``tokens.keys`` ``[B, M, C]``, each merged token rotated by
    its group's mean position, ``tokens.bias`` on the merged keys' logits; the prompt's tokens are
    first, as in diffusers' ``FluxAttnProcessor``, whose arithmetic this is, and the attention itself
    goes through diffusers' ``dispatch_attention_fn`` with the processor's backend. Returns what the
    module returns: ``(image [B, Nq, C], prompt [B, T, C])`` for a double-stream block, the sequence
    ``[B, T + Nq, C]`` for a single-stream one (whose ``tokens.text`` is the prompt part of its input)."""
    if kwargs.get("ip_hidden_states") is not None:
        raise ValueError("sdmerge cannot merge tokens in a Flux attention with an IP-Adapter; call sdmerge.remove first")
    text, joint = tokens.text, attn.added_kv_proj_dim is not None
    if attn.fused_projections and not tokens.queries_merged:
        raise ValueError(
            "kv_only cannot merge a Flux attention with fused QKV projections: its keys and values need a projection "
            "of their own; call unfuse_qkv_projections() first"
        )

    def heads(x: Tensor) -> Tensor:  # [B, S, H*d] -> [B, S, H, d]
        return x.unflatten(-1, (-1, attn.head_dim))

    query_tokens, key_tokens = tokens.queries, tokens.keys
    if not joint:  # single-stream: the prompt's tokens go through the same projections
        query_tokens, key_tokens = torch.cat([text, query_tokens], dim=1), torch.cat([text, key_tokens], dim=1)
    if tokens.queries_merged and attn.fused_projections:
        query, key, value = attn.to_qkv(query_tokens).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(query_tokens), attn.to_k(key_tokens), attn.to_v(key_tokens)
    query, key, value = attn.norm_q(heads(query)), attn.norm_k(heads(key)), heads(value)
    if joint:
        if attn.fused_projections and hasattr(attn, "to_added_qkv"):
            text_query, text_key, text_value = attn.to_added_qkv(text).chunk(3, dim=-1)
        else:
            text_query, text_key, text_value = attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)
        query = torch.cat([attn.norm_added_q(heads(text_query)), query], dim=1)
        key = torch.cat([attn.norm_added_k(heads(text_key)), key], dim=1)
        value = torch.cat([heads(text_value), value], dim=1)

    count, prompt = tokens.queries.shape[1], text.shape[1]
    table_cos, table_sin = kwargs["image_rotary_emb"]  # [T + N, D]: the prompt's, then every image token's
    merged_cos, merged_sin = _merged_rotation(pos_embed, tokens)
    batch = query.shape[0]

    def table(image_cos: Tensor, image_sin: Tensor) -> tuple[Tensor, Tensor]:
        text_cos, text_sin = table_cos[:prompt].expand(batch, -1, -1), table_sin[:prompt].expand(batch, -1, -1)
        return torch.cat([text_cos, image_cos.expand(batch, -1, -1)], 1), torch.cat([text_sin, image_sin.expand(batch, -1, -1)], 1)

    if tokens.queries_merged:
        query_rotation = table(merged_cos, merged_sin)
    else:
        query_rotation = table(table_cos[None, prompt:], table_sin[None, prompt:])
    query, key = _rotated(query, *query_rotation), _rotated(key, *table(merged_cos, merged_sin))
    mask = None if tokens.bias is None else F.pad(tokens.bias, (prompt, 0))  # the prompt's keys: no bias
    processor = attn.processor
    out = dispatch_attention_fn(
        query, key, value, attn_mask=mask, backend=getattr(processor, "_attention_backend", None),
        parallel_config=getattr(processor, "_parallel_config", None),
    )
    out = out.flatten(2, 3).to(query.dtype)
    if not joint:
        return out
    text_out, image_out = out.split_with_sizes([prompt, count], dim=1)
    image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
    return image_out, attn.to_add_out(text_out.contiguous())


def joint_attention_mass(pos_embed: nn.Module, attn, image: Tensor, text: Tensor, call) -> Tensor:
    """``p`` ``[B, N]`` float32 of a Flux attention about to receive the image tokens ``image``
    ``[B, N, C]`` and the prompt's tokens ``text`` ``[B, T, C]``: the attention the prompt's tokens pay
    to each image token (see :mod:`sdmerge.diffusion.prompt_importance`), with the attention's own
    projections, normalisations and rotary positions."""
    joint = attn.added_kv_proj_dim is not None

    def heads(x: Tensor) -> Tensor:  # [B, S, H*d] -> [B, S, H, d]
        return x.unflatten(-1, (-1, attn.head_dim))

    if joint:
        query, key_text = attn.norm_added_q(heads(attn.add_q_proj(text))), attn.norm_added_k(heads(attn.add_k_proj(text)))
    else:
        query, key_text = attn.norm_q(heads(attn.to_q(text))), attn.norm_k(heads(attn.to_k(text)))
    key_image = attn.norm_k(heads(attn.to_k(image)))
    text_ids, image_ids = call.positions
    cos, sin = pos_embed(torch.cat([text_ids, image_ids], dim=0))
    prompt = text.shape[1]
    query, key_text = _rotated(query, cos[None, :prompt], sin[None, :prompt]), _rotated(key_text, cos[None, :prompt], sin[None, :prompt])
    key_image = _rotated(key_image, cos[None, prompt:], sin[None, prompt:])
    return prompt_mass_on_image(query.transpose(1, 2), key_image.transpose(1, 2), key_text.transpose(1, 2))


def _double_site(name: str, block, pos_embed: nn.Module) -> BlockSite:
    attention = Branch(
        f"{name}.attn", block.attn, HIDDEN_STATES, output=0, text=Argument("encoder_hidden_states"),
        merged_attention=partial(attention_on_merged_tokens, pos_embed), stock_merged=False,
    )
    return BlockSite(
        name, block, HIDDEN_STATES, carrier="", attention=attention, mlp=Branch(f"{name}.ff", block.ff, HIDDEN_STATES),
        mass=PromptMass(block.attn, partial(joint_attention_mass, pos_embed), this_call=True),
    )


def _single_site(name: str, block, pos_embed: nn.Module) -> BlockSite:
    attention = Branch(
        f"{name}.attn", block.attn, HIDDEN_STATES, text_first=True,
        merged_attention=partial(attention_on_merged_tokens, pos_embed), stock_merged=False,
    )
    return BlockSite(
        name, block, HIDDEN_STATES, carrier="", attention=attention,
        mlp=Branch(f"{name}.proj_mlp", block.proj_mlp, Argument("input", 0), text_first=True),
        mass=PromptMass(block.attn, partial(joint_attention_mass, pos_embed), this_call=True),
        span=Span(block.norm, 0, Branch(f"{name}.proj_out", block.proj_out, Argument("input", 0), text_first=True)),
    )


def layout(transformer: FluxTransformer2DModel, config: MergeConfig) -> Layout:
    """The merged blocks (``blocks`` over the double- then the single-stream blocks; default: all
    but the first and the last)."""
    double = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    single = [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    pos_embed = transformer.pos_embed

    def site(name: str, block, index: int) -> BlockSite:
        return (_double_site if index < len(double) else _single_site)(name, block, pos_embed)

    return transformer_layout(
        FAMILY, transformer, config, double + single, site, MODEL_KWARGS, BLOCK_KWARGS, Argument("timestep", 3),
        token_grid, positions=token_ids, timestep_scale=1000.0,
    )
