"""Token merging in Hugging Face transformers ViT and DeiT models.

    model = transformers.AutoModelForImageClassification.from_pretrained(path)   # ViT or DeiT
    sdmerge.apply(model, method="cis", r=0.7)    # keep floor(196 * 0.7^s) patch tokens after blocks 3, 6, 9
    sdmerge.remove(model)                         # back to the original model, exactly

Supported classes: ``ViTModel``, ``ViTForImageClassification``, ``DeiTModel``,
``DeiTForImageClassification``, ``DeiTForImageClassificationWithTeacher``, in the two layer
layouts of transformers 4.50 to 5.24 (recognised by structure, not by version number):

- 5.9 and later: ``base_model.layers``, attention with ``q_proj/k_proj/v_proj/o_proj``, ``layer.mlp``;
- 4.50 to 5.8 (4.50: the first release whose ViT attention goes through ``ALL_ATTENTION_FUNCTIONS``):
  ``base_model.encoder.layer``, ``attention.attention.query/key/value``, ``attention.output.dense``,
  ``layer.intermediate`` and ``layer.output`` (which adds the residual).

How (see :mod:`sdmerge.vit.reduction`): every ``ViTLayer``/``DeiTLayer`` and its attention
get an instance ``forward``; a forward hook on the embeddings starts a new
:class:`~sdmerge.vit.reduction.ReductionState` for every call. A block with nothing to do
(no reduction so far, none in it) runs its original forward. The others run

    h = x + attention(layernorm_before(x), mask=log(sizes))
    h = reduce(h)                                   # only in reducing blocks
    out = h + mlp(layernorm_after(h))

The proportional-attention bias goes to the attention function of the model's
``config._attn_implementation`` as an additive mask: ``sdpa`` adds it to the logits, and so
does the ``eager`` function of 5.9+; in the older layout ``eager`` multiplies its mask onto
the probabilities (a head mask, 4.x) or takes none (5.0-5.8), so there ``eager`` runs
:func:`additive_eager_attention`, the same arithmetic with the bias added. Other
implementations (flash attention) cannot take a bias, so ``prop_attn=True`` is refused for
them. A reducing block whose method needs the class-token attention row also computes that row
(:func:`~sdmerge.vit.reduction.class_token_attention`). Class-token (and distillation-token)
read-outs need no change: protected tokens keep positions 0 and 1. ``last_hidden_state`` has
the reduced token count.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
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
from .options import ReductionOptions
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


def apply(model, method: str = "tome", r: float | None = None, **options):
    """Patch a transformers ViT/DeiT model in place to merge tokens; returns ``model``.

    ``method``: ``tome``, ``atc_single``, ``atc_complete``, ``atc_average``, ``cis``, ``crucial``,
    ``topk`` or ``evit``. ``r``: keep rate at each stage, ``0 < r <= 1`` (stage protocol:
    ``floor(P r^s)`` of the ``P`` patch tokens are kept after stage ``s``); ``None``: 0.5.
    ``options``: :class:`~sdmerge.vit.options.ReductionOptions` (``stages``, ``tokens_per_block``,
    ``schedule``, ``prop_attn``, ``cis_score``, ``evit_fusion``).

    Raises ``TypeError`` for an unsupported model or an unknown option (listing the accepted
    ones), and ``ValueError`` for an unknown method, an ambiguous or invalid schedule, or one that
    asks a block for more removals than the method can make at the model's token count. Applying
    again replaces the previous patch; a request that fails leaves the model as it was.
    """
    if not accepts(model):
        raise TypeError(f"sdmerge.vit.transformers supports {SUPPORTED}; got {type(model).__name__}")
    base = model.base_model
    layout, layers = _layout_of(base)
    protected = 2 if isinstance(base, DeiTModel) else 1  # DeiTEmbeddings always add a distillation token
    config = ReductionConfig.from_options(
        method, len(layers), base.embeddings.patch_embeddings.num_patches + protected, protected, r,
        ReductionOptions.from_options(options),
    )
    check_attention_implementation(base.config._attn_implementation, config.proportional_attention)
    remove(model)
    patch = ModelPatch(base, config, base.embeddings)
    for block, layer in enumerate(layers):
        module = layout.attention_module(layer)
        patch.replace(module, "forward", _AttentionForward(patch, layout, module, block))
        patch.replace(layer, "forward", _LayerForward(patch, layout, layer, block))
    return model


def remove(model) -> None:
    """Undo :func:`apply`: original forwards, no hooks, bit-identical outputs. No-op if not patched."""
    remove_patch(model.base_model)


def blocks(model) -> nn.ModuleList:
    """The model's transformer layers in order, in either layout (``base_model.layers`` or
    ``base_model.encoder.layer``); ``TypeError`` for an unsupported layout."""
    return _layout_of(model.base_model)[1]


def reduction_state(model) -> ReductionState | None:
    """The reduction state of the model's latest forward call (token ``sizes`` ``[B, N_L]`` and
    ``provenance``), or ``None`` before the first call; raises if ``model`` is not patched."""
    return latest_state(model.base_model)


def additive_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    """Eager attention with an additive mask: ``softmax(q k^T * scaling + mask) v``.

    ``query``/``key``/``value``: ``[B, H, N, Dh]``; ``attention_mask``: ``[B, 1, 1, N]`` or ``None``.
    Returns ``([B, N, H, Dh], probabilities [B, H, N, N])``, with transformers' eager arithmetic
    (softmax in float32, then the input dtype); without a mask it equals transformers 4.50-4.57's eager.
    """
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class _ProjectionLayout:
    """transformers 5.9 and later: ``base_model.layers``; ``layer.attention`` projects
    (``q_proj/k_proj/v_proj``), attends and applies ``o_proj``, returning ``(output, probabilities)``;
    the layer returns a tensor."""

    name = "transformers >= 5.9 (base_model.layers, attention q_proj/k_proj/v_proj/o_proj)"
    mask_argument = "attention_mask"
    layer_parts = ("layernorm_before", "attention", "dropout", "layernorm_after", "mlp")
    attention_parts = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "attention_dropout", "config")

    def layers(self, base):
        return getattr(base, "layers", None)

    def for_layers(self, layers):
        return self

    def attention_module(self, layer) -> nn.Module:
        """The module whose forward sdmerge replaces: it computes queries, keys, values and attention."""
        return layer.attention

    def projections(self, module):
        """``(query, key, value, head_dim, scaling, dropout probability)`` of the attention module."""
        return module.q_proj, module.k_proj, module.v_proj, module.head_dim, module.scaling, module.attention_dropout

    def attention_function(self, module, implementation: str) -> Callable:
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, inspect.getmodule(type(module)).eager_attention_forward)

    def function_options(self, module, kwargs) -> dict:
        return kwargs

    def output(self, module, out):
        return module.o_proj(out)

    def attend(self, layer, normed, bias, options):
        """The attention output ``[B, N, C]`` of ``layer`` for ``normed`` tokens, with ``bias``."""
        return layer.attention(normed, bias, **options)[0]

    def attention_residual(self, layer, attended, hidden):
        return layer.dropout(attended) + hidden

    def mlp_residual(self, layer, hidden):
        return layer.dropout(layer.mlp(layer.layernorm_after(hidden))) + hidden

    def layer_options(self, args, kwargs) -> dict:
        return kwargs


class _EncoderLayerLayout:
    """transformers 4.50 to 5.8: ``base_model.encoder.layer``; ``layer.attention`` wraps a
    self-attention module (``query/key/value`` and the attention, patched by sdmerge) and
    ``attention.output`` (dense, dropout); ``layer.output`` adds the MLP residual. Before 4.56
    layers return tuples and take ``head_mask``/``output_attentions``, 4.56-4.57 return tensors
    and take ``head_mask``, 5.0-5.8 take the hidden states only."""

    name = "transformers 4.50-5.8 (encoder.layer, attention.attention.query/key/value, attention.output.dense)"
    mask_argument = "head_mask"
    layer_parts = ("layernorm_before", "attention", "intermediate", "output", "layernorm_after")
    attention_parts = (
        "attention.query", "attention.key", "attention.value", "attention.attention_head_size", "attention.scaling",
        "attention.dropout_prob", "attention.is_causal", "attention.config", "output.dense", "output.dropout",
    )

    def __init__(self, returns_tuples: bool = True):
        self.returns_tuples = returns_tuples

    def layers(self, base):
        return getattr(getattr(base, "encoder", None), "layer", None)

    def for_layers(self, layers):
        return _EncoderLayerLayout("output_attentions" in inspect.signature(type(layers[0]).forward).parameters)

    def attention_module(self, layer) -> nn.Module:
        return layer.attention.attention

    def projections(self, module):
        return module.query, module.key, module.value, module.attention_head_size, module.scaling, module.dropout_prob

    def attention_function(self, module, implementation: str) -> Callable:
        # this layout's eager attention multiplies its mask onto the probabilities (4.x) or has none (5.0-5.8)
        return additive_eager_attention if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]

    def function_options(self, module, kwargs) -> dict:
        return {"is_causal": module.is_causal}

    def output(self, module, out):
        return out

    def attend(self, layer, normed, bias, options):
        attend = layer.attention.attention
        context = (attend(normed) if bias is None else attend(normed, bias))[0]  # 5.0-5.8 take no mask argument
        return layer.attention.output(context, normed)

    def attention_residual(self, layer, attended, hidden):
        return attended + hidden

    def mlp_residual(self, layer, hidden):
        out = layer.output(layer.intermediate(layer.layernorm_after(hidden)), hidden)  # ViTOutput adds the residual
        return (out,) if self.returns_tuples else out

    def layer_options(self, args, kwargs) -> dict:
        if any(args) or kwargs.get("output_attentions"):
            raise ValueError("sdmerge: output_attentions is not supported on a patched ViT/DeiT model before transformers 4.56")
        return {}


_LAYOUTS = (_ProjectionLayout(), _EncoderLayerLayout())


def _missing_parts(layout, layer) -> list[str]:
    missing = [p for p in layout.layer_parts if not hasattr(layer, p)]
    for path in layout.attention_parts:
        owner = getattr(layer, "attention", None)
        for name in path.split("."):
            owner = getattr(owner, name, None)
        if owner is None:
            missing.append(f"attention.{path}")
    return missing


def _layout_of(base):
    """``(layout, layers)`` of a base model, or a ``TypeError`` naming what each layout misses."""
    problems = []
    for layout in _LAYOUTS:
        layers = layout.layers(base)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            problems.append(f"{layout.name}: no list of layers")
            continue
        missing = next((parts for parts in (_missing_parts(layout, layer) for layer in layers) if parts), None)
        if missing is None:
            return layout.for_layers(layers), layers
        problems.append(f"{layout.name}: a layer lacks {', '.join(missing)}")
    raise TypeError(f"unsupported {type(base).__name__} layout; sdmerge.vit.transformers supports " + "; ".join(problems))


class _LayerForward:
    """``ViTLayer``/``DeiTLayer`` forward with a reduction between attention and MLP."""

    def __init__(self, patch: ModelPatch, layout, layer: nn.Module, block: int):
        self.patch, self.layout, self.layer, self.block = patch, layout, layer, block
        self.original = layer.forward

    def __call__(self, hidden_states, *args, **kwargs):
        state, layer, layout = self.patch.state, self.layer, self.layout
        mask = args[0] if args else kwargs.get(layout.mask_argument)
        if mask is not None:
            raise ValueError(f"sdmerge: {layout.mask_argument} cannot follow merged tokens; call the model without it")
        options = layout.layer_options(args[1:], {k: v for k, v in kwargs.items() if k != layout.mask_argument})
        if state.is_plain(self.block):
            return self.original(hidden_states, *args, **kwargs)
        normed = layer.layernorm_before(hidden_states)
        attended = layout.attend(layer, normed, state.attention_bias(hidden_states.dtype), options)
        hidden_states = layout.attention_residual(layer, attended, hidden_states)
        if state.reduces(self.block):
            hidden_states = state.reduce(self.block, hidden_states)
        return layout.mlp_residual(layer, hidden_states)


class _AttentionForward:
    """Forward of the module that computes a layer's attention (transformers >= 5.9: ``ViTAttention``;
    before: ``ViTSelfAttention``; DeiT alike). Its second positional argument, from sdmerge's
    layer forward, is the proportional-attention bias; in reducing blocks it records keys (and
    ``A_cls``, values). Without a bias and outside reducing blocks: the original forward, called
    exactly as the model called it. Returns ``(output [B, N, C], probabilities or None)``."""

    def __init__(self, patch: ModelPatch, layout, module: nn.Module, block: int):
        self.patch, self.layout, self.module, self.block = patch, layout, module, block
        self.original = module.forward

    def __call__(self, hidden_states, *args, **kwargs):
        state, layout, module = self.patch.state, self.layout, self.module
        attention_mask = args[0] if args else None
        if attention_mask is None and not state.reduces(self.block):
            return self.original(hidden_states, *args, **kwargs)
        q_proj, k_proj, v_proj, head_dim, scaling, dropout = layout.projections(module)
        shape = (*hidden_states.shape[:-1], -1, head_dim)
        query = q_proj(hidden_states).view(shape).transpose(1, 2)
        key = k_proj(hidden_states).view(shape).transpose(1, 2)
        value = v_proj(hidden_states).view(shape).transpose(1, 2)

        implementation = module.config._attn_implementation
        check_attention_implementation(implementation, attention_mask is not None)
        function = layout.attention_function(module, implementation)
        out, probabilities = function(  # out: [B, N, H, Dh]
            module, query, key, value, attention_mask, dropout=dropout if module.training else 0.0, scaling=scaling,
            **layout.function_options(module, kwargs),
        )
        state.record_attention(self.block, query, key, value, scaling, attention_mask)
        return layout.output(module, out.reshape(*hidden_states.shape[:-1], -1).contiguous()), probabilities
