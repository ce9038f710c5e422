"""The SD3 layout: Stable Diffusion 3 / 3.5 ``SD3Transformer2DModel`` (MMDiT ``JointTransformerBlock``s).

A joint block runs one attention over the image tokens and the prompt tokens together (image
first), then a feed-forward per stream; SD3.5-Medium's first blocks add an image-only second
self-attention ``attn2``, and the last block keeps no prompt output (``context_pre_only``)::

    image x [B, N, C] --norm1--> h ----+                          +--> attn out [B, N, C] --+--> x + gate * ...
                                        \\                        /
                                         joint attention (image queries, keys, values + prompt's)
                                        /                        \\
    prompt c [B, T, C] --norm1_context--+                          +--> prompt out (unless context_pre_only)
    (SD3.5: h2 --> attn2 --> x + gate2 * ...)      then  x + gate * ff(norm2(x)),  c + ... ff_context(...)

Only image tokens are merged: ``attn`` takes the merged image tokens ``h`` ``[B, M, C]`` and the
whole prompt, and its image output is unmerged (the prompt's tokens still attend to, and are
attended by, every group); ``merge_crossattn`` merges ``attn2``'s input, ``merge_mlp`` ``ff``'s. The
prompt stream (``norm1_context``, ``ff_context``) is never merged. The position embedding is added
to the tokens before the blocks (``PatchEmbed``), so a merged token carries its group's mean
position. ``kv_only``: every image query, keys and values of the merged image tokens and of the
prompt (:func:`joint_attention_on_merged_tokens`). ``cis`` / ``crucial``: the attention the prompt
pays to each image token in the same call (:func:`~sdmerge.diffusion.prompt_importance.joint_attention_mass`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from torch import Tensor

from ..config import MergeConfig
from ..layout import Argument, AttentionTokens, BlockSite, Branch, Layout, PromptMass, held, uncompiled
from ..prompt_importance import joint_attention_mass
from .dit import patch_grid, transformer_layout

SUPPORTED = "StableDiffusion3Pipeline (and img2img / inpaint / ControlNet), SD3Transformer2DModel (torch.compile'd or not)"

FAMILY = "SD3"
HIDDEN_STATES = Argument("hidden_states", 0)
MODEL_KWARGS = Argument("joint_attention_kwargs", 5)  # SD3Transformer2DModel.forward's 6th argument
BLOCK_KWARGS = Argument("joint_attention_kwargs", 3)  # JointTransformerBlock.forward's 4th (checkpointing passes all)


def find(model) -> SD3Transformer2DModel | None:
    """``model`` or ``model.transformer`` as an SD3Transformer2DModel (compiled or not), else ``None``."""
    return held(model, "transformer", SD3Transformer2DModel)


def why_unsupported(model) -> str | None:
    """An SD3 ControlNet holds joint blocks of its own, which sdmerge leaves unmerged."""
    if type(uncompiled(model)).__name__ == "SD3ControlNetModel":
        return (
            "SD3ControlNetModel is a ControlNet, which sdmerge leaves unmerged: it merges tokens in the pipeline's "
            "transformer only. Pass the pipeline or its transformer: sdmerge.apply(pipe)"
        )
    return None


def joint_attention_on_merged_tokens(attn, args: tuple, kwargs: dict, tokens: AttentionTokens):
    """SD3's joint attention (the arithmetic of diffusers' ``JointAttnProcessor2_0``) with queries of
    the image tokens ``tokens.queries`` ``[B, Nq, C]`` and of the prompt ``c`` ``[B, T, C]``, keys and
    values of the merged image tokens ``tokens.keys`` ``[B, M, C]`` and of the prompt, and
    ``tokens.bias`` ``[B, 1, 1, M]`` (``log(sizes)``, or ``None``) on the merged keys' logits (0 on
    the prompt's): ``kv_only``, and ``prop_attn``, which the stock processor cannot do (it projects
    keys from its queries' tokens and takes no mask). Returns ``(image [B, Nq, C], prompt [B, T, C])``
    as the module does, or the image output alone without a prompt (SD3.5's ``attn2``)."""
    text, bias, heads = tokens.text, tokens.bias, attn.heads

    def split(x: Tensor) -> Tensor:  # [B, S, H*d] -> [B, H, S, d]
        return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    query, key, value = split(attn.to_q(tokens.queries)), split(attn.to_k(tokens.keys)), split(attn.to_v(tokens.keys))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if text is not None:
        text_query, text_key = split(attn.add_q_proj(text)), split(attn.add_k_proj(text))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        query = torch.cat([query, text_query], dim=2)
        key = torch.cat([key, text_key], dim=2)
        value = torch.cat([value, split(attn.add_v_proj(text))], dim=2)
        if bias is not None:
            bias = F.pad(bias, (0, text.shape[1]))  # the prompt's keys: no bias
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    count = tokens.queries.shape[1]
    out = out.transpose(1, 2).reshape(out.shape[0], -1, heads * query.shape[-1]).to(query.dtype)
    image = attn.to_out[1](attn.to_out[0](out[:, :count]))
    if text is None:
        return image
    prompt = out[:, count:]
    return image, prompt if attn.context_pre_only else attn.to_add_out(prompt)


def _site(name: str, block) -> BlockSite:
    attn2 = block.attn2 if block.use_dual_attention else None
    return BlockSite(
        name,
        block,
        HIDDEN_STATES,
        carrier="",
        attention=Branch(
            f"{name}.attn", block.attn, Argument("hidden_states", 0), output=0, text=Argument("encoder_hidden_states"),
            merged_attention=joint_attention_on_merged_tokens,
        ),
        crossattn=None if attn2 is None else Branch(f"{name}.attn2", attn2, Argument("hidden_states", 0)),
        mlp=Branch(f"{name}.ff", block.ff, HIDDEN_STATES),
        mass=PromptMass(block.attn, joint_attention_mass, this_call=True),
    )


def layout(transformer: SD3Transformer2DModel, config: MergeConfig) -> Layout:
    """The merged joint blocks (``blocks``; default: all but the first and the last)."""
    blocks = [(f"transformer_blocks.{i}", block) for i, block in enumerate(transformer.transformer_blocks)]
    grid = patch_grid(HIDDEN_STATES, transformer.config.patch_size)
    return transformer_layout(
        FAMILY, transformer, config, blocks, lambda name, block, index: _site(name, block), MODEL_KWARGS,
        BLOCK_KWARGS, Argument("timestep", 3), grid,
    )
