"""sdmerge on timm's real VisionTransformer (tiny, random weights).

timm is optional: ``pip install --no-deps timm`` (its other requirements come with
transformers; torchvision is replaced by a stand-in at import, see torchvision_stand_in.py).
"""

from __future__ import annotations

import pytest
import torch
from tests.torchvision_stand_in import import_timm
from tests.vit_layout import hf_layers, hf_parts
from transformers import ViTConfig, ViTForImageClassification

import sdmerge
from sdmerge.vit import reduction_state

timm = import_timm()
pytestmark = [
    pytest.mark.skipif(timm is None, reason="timm is not installed (pip install --no-deps timm)"),
    pytest.mark.usefixtures("one_torch_thread"),
]
METHODS = ("tome", "atc_single", "atc_complete", "atc_average", "cis", "crucial", "topk", "evit")
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10)


def tiny(seed=0, fused=True, distilled=False, **overrides):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = (VisionTransformerDistilled if distilled else VisionTransformer)(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "token" in name or "pos_embed" in name:
                parameter.normal_(std=0.5)  # timm initialises some of these to zero
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model


def images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def token_counts(model, x):
    counts = []
    hooks = [block.register_forward_hook(lambda m, a, out: counts.append(out.shape[1])) for block in model.blocks]
    model(x)
    for hook in hooks:
        hook.remove()
    return counts


VARIANTS = {
    "class token": dict(),
    "distilled": dict(distilled=True),
    "registers, avg pool": dict(reg_tokens=2, global_pool="avg"),
    "no class token, avg pool": dict(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("fused", [True, False])
def test_keep_rate_one_and_remove_are_bit_identical(variant, fused):
    model, x = tiny(fused=fused, **VARIANTS[variant]), images()
    reference = model(x)
    methods = METHODS if model.has_class_token else ("tome", "atc_average")
    for method in methods:
        sdmerge.apply(model, method, r=1.0)
        assert torch.equal(model(x), reference), method
        sdmerge.apply(model, method, tokens_per_block=2)
        assert not torch.equal(model(x), reference), method
        sdmerge.remove(model)
        assert torch.equal(model(x), reference), method
    assert not any("forward" in m.__dict__ for m in model.modules()) and "pool" not in model.__dict__
    assert not model.norm_pre._forward_hooks


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_and_protected_prefix(method):
    model, x = tiny(reg_tokens=2), images()  # class token and 2 register tokens
    assert model.num_prefix_tokens == 3
    fused = 1 if method == "evit" else 0  # EViT's fused token comes in addition to the kept tokens
    sdmerge.apply(model, method, tokens_per_block=3)
    assert token_counts(model, x) == [16 + fused, 13 + 2 * fused, 10 + 3 * fused, 7 + 4 * fused]
    sdmerge.apply(model, method, r=0.7)  # default stages 1, 2, 3 of 4 blocks: floor(16 * 0.7^s) = 11, 7, 5 free tokens
    assert token_counts(model, x) == [19, 14 + fused, 10 + fused, 8 + fused]
    labels = reduction_state(model).provenance.labels
    assert torch.equal(labels[:, :3], torch.tensor([[0, 1, 2]] * 3)) and (labels[:, 3:] >= 3).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("options", [dict(tokens_per_block=2), dict(r=0.6), dict(tokens_per_block=3, schedule="linear")])
def test_timm_and_transformers_integrations_agree(method, options):
    """The same weights in timm and in transformers give the same patched logits."""
    timm_model = tiny()
    config = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
        num_labels=10, layer_norm_eps=1e-6, qkv_bias=True,
    )
    hf = ViTForImageClassification(config).eval()
    t = timm_model
    with torch.no_grad():
        emb = hf.vit.embeddings
        emb.cls_token.copy_(t.cls_token)
        emb.position_embeddings.copy_(t.pos_embed)
        emb.patch_embeddings.projection.load_state_dict(t.patch_embed.proj.state_dict())
        for layer, block in zip(hf_layers(hf), t.blocks):
            parts = hf_parts(layer)
            parts.layernorm_before.load_state_dict(block.norm1.state_dict())
            parts.layernorm_after.load_state_dict(block.norm2.state_dict())
            for i, proj in enumerate((parts.query, parts.key, parts.value)):
                proj.weight.copy_(block.attn.qkv.weight[32 * i : 32 * (i + 1)])
                proj.bias.copy_(block.attn.qkv.bias[32 * i : 32 * (i + 1)])
            parts.output.load_state_dict(block.attn.proj.state_dict())
            parts.fc1.load_state_dict(block.mlp.fc1.state_dict())
            parts.fc2.load_state_dict(block.mlp.fc2.state_dict())
        hf.vit.layernorm.load_state_dict(t.norm.state_dict())
        hf.classifier.load_state_dict(t.head.state_dict())
    x = images()
    torch.testing.assert_close(hf(x).logits, t(x), rtol=1e-5, atol=1e-5)
    sdmerge.apply(hf, method, **options)
    sdmerge.apply(t, method, **options)
    torch.testing.assert_close(hf(x).logits, t(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(reduction_state(t).provenance.labels, sdmerge.vit.reduction_state(hf).provenance.labels)


@pytest.mark.parametrize("global_pool", ["avg", "avgmax"])
@pytest.mark.parametrize("method", ["tome", "atc_complete"])
def test_mean_pooling_is_size_weighted(global_pool, method):
    model, x = tiny(class_token=False, global_pool=global_pool, reg_tokens=1), images()
    sdmerge.apply(model, method, tokens_per_block=3)
    seen = {}
    model.norm.register_forward_hook(lambda m, a, out: seen.update(tokens=out))
    model(x)
    provenance = reduction_state(model).provenance
    tokens = seen["tokens"]
    # a merged token standing for s patches counts s times: the mean over the original patches
    expected = provenance.unmerge(tokens)[:, 1:].mean(dim=1)
    if global_pool == "avgmax":
        expected = 0.5 * (tokens[:, 1:].amax(dim=1) + expected)
    torch.testing.assert_close(model.pool(tokens), expected)
    from timm.models.vision_transformer import global_pool_nlc

    unweighted = global_pool_nlc(tokens, pool_type=global_pool, num_prefix_tokens=1)  # what timm alone computes
    assert (model.pool(tokens) - unweighted).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["topk", "evit"])
def test_mean_pooling_after_pruning_counts_every_token_once(method):
    from timm.models.vision_transformer import global_pool_nlc

    model, x = tiny(global_pool="avg"), images()
    sdmerge.apply(model, method, tokens_per_block=3)
    seen = {}
    model.norm.register_forward_hook(lambda m, a, out: seen.update(tokens=out))
    model(x)
    if method == "evit":  # its fused tokens hold several patches, and count once like any token
        assert reduction_state(model).provenance.merged_sizes.max() > 1
    tokens = seen["tokens"]
    assert torch.equal(model.pool(tokens), global_pool_nlc(tokens, pool_type="avg", num_prefix_tokens=1))


def test_unsupported_timm_models_and_options():
    with pytest.raises(ValueError, match="method 'cis' ranks tokens by class-token attention"):
        sdmerge.apply(tiny(class_token=False, global_pool="avg"), "cis")
    with pytest.raises(TypeError, match="attention pooling"):
        sdmerge.apply(tiny(class_token=False, global_pool="map"), "tome")
    from timm.models.vision_transformer import ResPostBlock

    with pytest.raises(TypeError, match="block 0 is ResPostBlock"):
        sdmerge.apply(tiny(block_fn=ResPostBlock), "tome")
    with pytest.raises(ValueError, match="remove 9 of 17 tokens in block 0.*at most 8"):
        sdmerge.apply(tiny(), "tome", tokens_per_block=9)
    model = tiny()
    sdmerge.apply(model, "tome", r=0.7)
    with pytest.raises(ValueError, match="attn_mask"):
        model(images(), attn_mask=torch.zeros(17, 17))
