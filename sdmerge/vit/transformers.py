"""Token merging in Hugging Face transformers ViT and DeiT models.

    model = transformers.AutoModelForImageClassification.from_pretrained(path)   # ViT or DeiT
    sdmerge.apply(model, method="cis", r=0.7)    # keep 70% of the tokens at blocks 3, 6, 9
    sdmerge.remove(model)                         # back to the original model, exactly

Supported classes: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher`` (transformers 5
layout: ``model.base_model.layers``, attention with ``q_proj/k_proj/v_proj/o_proj``).

How (see :mod:`sdmerge.vit.reduction`): every ``ViTLayer``/``DeiTLayer`` and its attention
get an instance ``forward``; a forward hook on the embeddings starts a new
:class:`~sdmerge.vit.reduction.ReductionState` for every call. A block with nothing to do
(no reduction so far, none in it) runs its original forward. The others run

    h = x + attention(layernorm_before(x), attention_mask=log(sizes))
    h = reduce(h)                                   # only in reducing blocks
    out = h + mlp(layernorm_after(h))

The proportional-attention bias goes to the attention function of the model's
``config._attn_implementation`` as its additive mask; ``eager`` and ``sdpa`` add it to the
logits, other implementations (flash attention) cannot take it, so ``prop_attn=True`` is
refused for them. A reducing block whose method needs the class-token attention row also
computes that row (:func:`~sdmerge.vit.reduction.class_token_attention`).
Class-token (and distillation-token) read-outs need no change: protected tokens keep
positions 0 and 1. ``last_hidden_state`` has the reduced token count.
"""

from __future__ import annotations

import inspect

from torch import nn
from transformers import (
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTForImageClassification,
    ViTModel,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .patch import ModelPatch, latest_state, remove_patch
from .reduction import ReductionConfig, ReductionState

SUPPORTED_CLASSES = (
    ViTModel,
    ViTForImageClassification,
    DeiTModel,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
)
SUPPORTED = ", ".join(cls.__name__ for cls in SUPPORTED_CLASSES)
BIAS_ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa")
"""``config._attn_implementation`` values whose attention adds a float mask to the logits."""

_LAYER_PARTS = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout", "config")


def accepts(model) -> bool:
    """Whether ``model`` is one of :data:`SUPPORTED_CLASSES` (or a subclass)."""
    return isinstance(model, SUPPORTED_CLASSES)


def check_attention_implementation(implementation: str, prop_attn: bool) -> None:
    """Raise unless proportional attention can act under ``implementation``."""
    if prop_attn and implementation not in BIAS_ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"proportional attention adds log(size) to the attention logits, which attention implementation "
            f"{implementation!r} cannot take; load the model with attn_implementation in "
            f"{BIAS_ATTENTION_IMPLEMENTATIONS} or pass prop_attn=False"
        )


def apply(
    model,
    method: str = "tome",
    r: float | None = None,
    *,
    stages=None,
    tokens_per_block: int | None = None,
    schedule: str | None = None,
    prop_attn: bool = True,
    cis_score: str | None = None,
):
    """Patch a transformers ViT/DeiT model in place to merge tokens; returns ``model``.

    Args:
        method: ``tome``, ``atc_single``, ``atc_complete``, ``atc_average``, ``cis``, ``crucial``,
            ``topk`` or ``evit``.
        r: keep rate at each stage, ``0 < r <= 1`` (stage protocol); ``None``: 0.5.
        stages: 0-based indices of the reducing blocks (default ``floor(k L / 4)``, k = 1, 2, 3:
            blocks 3, 6, 9 of a 12-block model).
        tokens_per_block: tokens removed in every block instead (per-block protocol); not
            together with ``r`` or ``stages``.
        schedule: ``"constant"`` (default) or ``"linear"`` (ToMe's ``floor(2t - 2tl/(L-1))``),
            with ``tokens_per_block`` only.
        prop_attn: proportional attention (``+ log(size)`` on the logits).
        cis_score: ``cis`` only: ``"code"`` (default, ``mean_h(A_cls) * ||mean_h(V)||``, the ToMeCIS
            code) or ``"paper"`` (``mean_h(A_cls * ||V||)``, the paper's text).

    Raises ``TypeError`` for an unsupported model and ``ValueError`` for an unknown method, an
    ambiguous or invalid schedule, or one that asks a block for more removals than the method
    can make at the model's token count. Applying again replaces the previous patch; a
    request that fails leaves the model as it was.
    """
    if not accepts(model):
        raise TypeError(f"sdmerge.vit.transformers supports {SUPPORTED}; got {type(model).__name__}")
    base = model.base_model
    layers = _checked_layers(base)
    protected = 2 if isinstance(base, DeiTModel) else 1  # DeiTEmbeddings always add a distillation token
    config = ReductionConfig.from_options(
        method, len(layers), base.embeddings.patch_embeddings.num_patches + protected, protected, r,
        stages=stages, tokens_per_block=tokens_per_block, schedule=schedule, prop_attn=prop_attn,
        cis_score=cis_score,
    )
    check_attention_implementation(base.config._attn_implementation, prop_attn)
    remove(model)
    patch = ModelPatch(base, config, base.embeddings)
    for block, layer in enumerate(layers):
        patch.replace(layer.attention, "forward", _AttentionForward(patch, layer.attention, block))
        patch.replace(layer, "forward", _LayerForward(patch, layer, block))
    return model


def remove(model) -> None:
    """Undo :func:`apply`: original forwards, no hooks, bit-identical outputs. No-op if not patched."""
    remove_patch(model.base_model)


def reduction_state(model) -> ReductionState | None:
    """The reduction state of the model's latest forward call (token ``sizes`` ``[B, N_L]`` and
    ``provenance``), or ``None`` before the first call; raises if ``model`` is not patched."""
    return latest_state(model.base_model)


def _checked_layers(base) -> nn.ModuleList:
    layers = getattr(base, "layers", None)
    problem = None
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        problem = "no `layers` list on the base model"
    else:
        for layer in layers:
            missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
            missing += [f"attention.{p}" for p in _ATTENTION_PARTS if not hasattr(layer.attention, p)]
            if missing:
                problem = f"{type(layer).__name__} lacks {', '.join(missing)}"
                break
    if problem:
        raise TypeError(
            f"unsupported {type(base).__name__} layout ({problem}); sdmerge.vit.transformers follows the transformers 5 "
            "ViT/DeiT layout (base_model.layers, attention q_proj/k_proj/v_proj/o_proj)"
        )
    return layers


class _LayerForward:
    """``ViTLayer``/``DeiTLayer`` forward with a reduction between attention and MLP."""

    def __init__(self, patch: ModelPatch, layer: nn.Module, block: int):
        self.patch, self.layer, self.block = patch, layer, block
        self.original = layer.forward

    def __call__(self, hidden_states, attention_mask=None, **kwargs):
        state, layer = self.patch.state, self.layer
        if attention_mask is not None:
            raise ValueError("sdmerge: attention_mask cannot follow merged tokens; call the model without it")
        if state.is_plain(self.block):
            return self.original(hidden_states, attention_mask, **kwargs)
        attended, _ = layer.attention(
            layer.layernorm_before(hidden_states), state.attention_bias(hidden_states.dtype), **kwargs
        )
        hidden_states = layer.dropout(attended) + hidden_states
        if state.reduces(self.block):
            hidden_states = state.reduce(self.block, hidden_states)
        return layer.dropout(layer.mlp(layer.layernorm_after(hidden_states))) + hidden_states


class _AttentionForward:
    """``ViTAttention``/``DeiTAttention`` forward that takes the proportional-attention bias as
    its mask and records keys (and ``A_cls``, values) in reducing blocks."""

    def __init__(self, patch: ModelPatch, attention: nn.Module, block: int):
        self.patch, self.attention, self.block = patch, attention, block
        self.eager = inspect.getmodule(type(attention)).eager_attention_forward

    def __call__(self, hidden_states, attention_mask=None, **kwargs):
        attn, state = self.attention, self.patch.state
        shape = (*hidden_states.shape[:-1], -1, attn.head_dim)
        query = attn.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = attn.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = attn.v_proj(hidden_states).view(shape).transpose(1, 2)
        dropout = attn.attention_dropout if attn.training else 0.0

        implementation = attn.config._attn_implementation
        check_attention_implementation(implementation, attention_mask is not None)
        function = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, self.eager)
        out, probabilities = function(  # out: [B, N, H, Dh]
            attn, query, key, value, attention_mask, dropout=dropout, scaling=attn.scaling, **kwargs
        )
        state.record_attention(self.block, query, key, value, attn.scaling, attention_mask)
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), probabilities
