"""Token merging in timm ``VisionTransformer`` models (optional: only when timm is installed).

    model = timm.create_model("deit_small_patch16_224", pretrained=True)
    sdmerge.apply(model, method="tome", tokens_per_block=13)
    sdmerge.remove(model)

Same options and behaviour as :mod:`sdmerge.vit.transformers`. Supported: ``VisionTransformer`` (and
subclasses such as ``VisionTransformerDistilled``) whose blocks are timm's pre-norm ``Block``
with timm's ``Attention`` (layer scale, drop path, q/k norm, gated attention included). The
``num_prefix_tokens`` (class, distillation, register tokens) are protected. Pooling:
``'token'`` reads the class token (unchanged); ``'avg'``/``'avgmax'`` become size-weighted
means over the merged tokens; ``'max'`` takes the maximum over merged tokens; attention
pooling (``'map'``, ``'prr'``) is refused; after pruning (``topk``, ``evit``) every token counts once,
EViT's fused token included. Methods that need the class-token attention
(``cis``, ``crucial``, ``topk``, ``evit``) need a class token.

timm's ``Attention`` adds a float ``attn_mask`` to its logits (fused and unfused paths), so the
proportional-attention bias is passed as that mask; a non-reducing block runs timm's own
attention code with it. This module never imports timm: a model is recognised only when timm
is already imported (it is, once a timm model exists).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .patch import ModelPatch, latest_state, remove_patch
from .options import ReductionOptions
from .reduction import ReductionConfig, ReductionState

SUPPORTED = "timm VisionTransformer (with timm installed)"
_MEAN_POOLS = ("avg", "avgmax")
_MODEL_PARTS = ("blocks", "norm_pre", "patch_embed", "pool", "global_pool", "attn_pool", "num_prefix_tokens",
                "has_class_token", "pool_include_prefix")


def _timm_classes():
    """``(VisionTransformer, Block, Attention)`` if timm is imported, else ``None``."""
    vit_module = sys.modules.get("timm.models.vision_transformer")
    if vit_module is None:
        return None
    return vit_module.VisionTransformer, vit_module.Block, sys.modules["timm.layers.attention"].Attention


def accepts(model) -> bool:
    """Whether ``model`` is a timm ``VisionTransformer`` (timm already imported)."""
    classes = _timm_classes()
    return classes is not None and isinstance(model, classes[0])


def apply(model, method: str = "tome", r: float | None = None, **options):
    """Patch a timm ``VisionTransformer`` in place; options as :func:`sdmerge.vit.transformers.apply`."""
    if not accepts(model):
        raise TypeError(f"sdmerge.vit.timm supports timm VisionTransformer models; got {type(model).__name__}")
    _check_model(model)
    config = ReductionConfig.from_options(
        method, len(model.blocks), model.patch_embed.num_patches + model.num_prefix_tokens, model.num_prefix_tokens, r,
        ReductionOptions.from_options(options),
    )
    if config.method.needs_importance and not model.has_class_token:
        raise ValueError(f"method {method!r} ranks tokens by class-token attention; this model has no class token")
    remove(model)
    # norm_pre runs once per call on the embedded tokens (prefix included), whatever runs the blocks
    patch = ModelPatch(model, config, model.norm_pre)
    for index, block in enumerate(model.blocks):
        patch.replace(block.attn, "forward", _AttentionForward(patch, block.attn, index))
        patch.replace(block, "forward", _BlockForward(patch, block, index))
    patch.replace(model, "pool", _SizeWeightedPool(patch, model))
    return model


def remove(model) -> None:
    """Undo :func:`apply` (original forwards, no hooks). No-op if not patched."""
    remove_patch(model)


def blocks(model) -> nn.Sequential:
    """The model's transformer blocks in order (``model.blocks``)."""
    return model.blocks


def reduction_state(model) -> ReductionState | None:
    """The reduction state of the latest forward call (see :func:`sdmerge.vit.reduction_state`)."""
    return latest_state(model)


def _check_model(model) -> None:
    missing = [a for a in _MODEL_PARTS if not hasattr(model, a)]
    if missing:
        raise TypeError(f"this timm version's VisionTransformer lacks {', '.join(missing)}; sdmerge needs timm >= 1.0")
    _, block_class, attention_class = _timm_classes()
    for index, block in enumerate(model.blocks):
        if type(block) is not block_class or type(block.attn) is not attention_class:
            raise TypeError(
                f"block {index} is {type(block).__name__} with {type(block.attn).__name__}; sdmerge supports timm's "
                "pre-norm Block with timm's Attention"
            )
    if model.attn_pool is not None:
        raise TypeError(f"attention pooling (global_pool={model.global_pool!r}) over merged tokens is not supported")


class _BlockForward:
    """timm ``Block`` forward with a reduction between the attention residual and the MLP."""

    def __init__(self, patch: ModelPatch, block: nn.Module, index: int):
        self.patch, self.block, self.index = patch, block, index
        self.original = block.forward

    def __call__(self, x, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("sdmerge: attn_mask / is_causal cannot follow merged tokens; call the model without them")
        state, block = self.patch.state, self.block
        if state.is_plain(self.index):
            return self.original(x)
        x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x), attn_mask=state.attention_bias(x.dtype))))
        if state.reduces(self.index):
            x = state.reduce(self.index, x)
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


class _AttentionForward:
    """timm ``Attention`` forward: timm's own code outside reducing blocks; in reducing blocks
    the same computation, recording keys, values (and ``A_cls``)."""

    def __init__(self, patch: ModelPatch, attention: nn.Module, index: int):
        self.patch, self.attention, self.index = patch, attention, index
        self.original = attention.forward

    def __call__(self, x, attn_mask=None, is_causal: bool = False):
        state, attn = self.patch.state, self.attention
        if not state.reduces(self.index):
            return self.original(x, attn_mask=attn_mask, is_causal=is_causal)
        B, N, _ = x.shape
        gate = getattr(attn, "gate", None)
        gate = gate(x).sigmoid() if gate is not None else None
        query, key, value = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        query, key = attn.q_norm(query), attn.k_norm(key)
        dropout = attn.attn_drop.p if attn.training else 0.0

        if attn.fused_attn:
            out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout)
        else:
            logits = (query * attn.scale) @ key.transpose(-2, -1)  # timm's unfused arithmetic
            probabilities = (logits if attn_mask is None else logits + attn_mask).softmax(dim=-1)
            out = attn.attn_drop(probabilities) @ value
        state.record_attention(self.index, query, key, value, attn.scale, attn_mask)
        out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))


class _SizeWeightedPool:
    """``VisionTransformer.pool`` with mean pooling weighted by token sizes after merging; after
    pruning (``topk``, ``evit``) timm's own pooling, every token counting once (EViT's fused token too)."""

    def __init__(self, patch: ModelPatch, model: nn.Module):
        self.patch, self.model = patch, model
        self.original = model.pool

    def __call__(self, x, pool_type: str | None = None):
        model, state = self.model, self.patch.state
        pool_type = model.global_pool if pool_type is None else pool_type
        if pool_type not in _MEAN_POOLS or state is None or state.sizes is None or state.config.method.prunes:
            return self.original(x, pool_type=pool_type)
        start = 0 if model.pool_include_prefix else model.num_prefix_tokens
        tokens, sizes = x[:, start:], state.sizes[:, start:]
        weights = (sizes / sizes.sum(dim=1, keepdim=True)).to(x.dtype)
        mean = torch.einsum("bn,bnc->bc", weights, tokens)
        return mean if pool_type == "avg" else 0.5 * (tokens.amax(dim=1) + mean)
