"""The parts of a transformers ViT/DeiT layer, in the transformers 5 and the 4.x layout, for tests.

transformers 5: ``base_model.layers``, ``attention.q_proj/k_proj/v_proj/o_proj``, ``layer.mlp``.
transformers 4.x: ``base_model.encoder.layer``, ``attention.attention.query/key/value``,
``attention.output.dense``, ``layer.intermediate`` + ``layer.output.dense``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


def hf_layers(model) -> nn.ModuleList:
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.encoder.layer


@dataclass
class LayerParts:
    layernorm_before: nn.Module
    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear
    layernorm_after: nn.Module
    fc1: nn.Linear
    activation: nn.Module
    fc2: nn.Linear
    heads: int

    def mlp(self, hidden: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(hidden)))


def hf_parts(layer) -> LayerParts:
    attention = layer.attention
    if hasattr(attention, "q_proj"):  # transformers 5
        return LayerParts(
            layer.layernorm_before, attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
            layer.layernorm_after, layer.mlp.fc1, layer.mlp.activation_fn, layer.mlp.fc2,
            attention.config.num_attention_heads,
        )
    self_attention = attention.attention
    return LayerParts(
        layer.layernorm_before, self_attention.query, self_attention.key, self_attention.value, attention.output.dense,
        layer.layernorm_after, layer.intermediate.dense, layer.intermediate.intermediate_act_fn, layer.output.dense,
        self_attention.num_attention_heads,
    )
