"""sdmerge.apply / remove on tiny transformers ViT and DeiT models (random weights, no downloads)."""

from __future__ import annotations

import copy
import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

import sdmerge
from sdmerge.core import alternating_split, bipartite_soft_matching, cosine_distances
from sdmerge.vit import reduction_state
from tests.vit_layout import hf_layers, hf_parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent

METHODS = ("tome", "atc_single", "atc_complete", "atc_average", "cis", "crucial", "topk", "evit")
TINY = dict(
    image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64
)  # 16 patches


def tiny(cls, attn="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    config_cls = DeiTConfig if cls.__name__.startswith("DeiT") else ViTConfig
    config = config_cls(**{**TINY, **overrides}, num_labels=10, attn_implementation=attn)
    model = cls(config).eval()
    if config_cls is DeiTConfig:  # DeiT initialises its class/distillation tokens to zero: make them distinct
        with torch.no_grad():
            model.base_model.embeddings.cls_token.normal_()
            model.base_model.embeddings.distillation_token.normal_()
            model.base_model.embeddings.position_embeddings.normal_(std=0.5)
    return model


def images(batch=3, size=32, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def output_of(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def token_counts(model, x, **call):
    """Tokens after each layer, read from the layers' outputs (not from sdmerge's state)."""
    counts = []
    hooks = [layer.register_forward_hook(lambda m, a, out: counts.append(first(out).shape[1])) for layer in hf_layers(model)]
    model(x, **call)
    for hook in hooks:
        hook.remove()
    return counts


def first(out):
    """A layer's (or its attention's) hidden states: attention modules, and layers before 4.56, return tuples."""
    return out[0] if isinstance(out, tuple) else out


def layer_io(model, block, x):
    """Inputs and outputs of layer ``block`` and of its attention, in one forward call."""
    seen = {}
    layer = hf_layers(model)[block]
    attention = hf_parts(layer).attention_module  # the module that takes the bias (tests.vit_layout)
    hooks = [
        layer.register_forward_hook(lambda m, a, out: seen.update(layer_in=a[0], layer_out=first(out))),
        attention.register_forward_hook(
            lambda m, a, out: seen.update(attn_in=a[0], attn_mask=a[1] if len(a) > 1 else None, attn_out=first(out))
        ),
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return seen


def hand_attention(layer, hidden, bias=None):
    """Attention output (as the module sdmerge patches returns it), probabilities, keys and
    values of ``layer``, computed from its weights."""
    parts = hf_parts(layer)
    B, N, _ = hidden.shape
    q, k, v = (p(hidden).view(B, N, parts.heads, -1).transpose(1, 2) for p in (parts.query, parts.key, parts.value))
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        logits = logits + bias.double()
    probs = logits.softmax(dim=-1)
    out = (probs @ v.double()).transpose(1, 2).reshape(B, N, -1)
    return parts.module_output(out.float()), probs, k, v


# --- exact identity -----------------------------------------------------------------------------

CLASSES = (ViTForImageClassification, ViTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTModel)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_rate_one_and_remove_are_bit_identical(cls, attn):
    model, x = tiny(cls, attn), images()
    reference = output_of(model, x)
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    for method in METHODS:
        sdmerge.apply(model, method, r=1.0)
        assert torch.equal(output_of(model, x), reference), method
        sdmerge.apply(model, method, tokens_per_block=0)
        assert torch.equal(output_of(model, x), reference), method
        sdmerge.apply(model, method, r=0.5 if method not in ("tome", "cis") else 0.6)
        assert not torch.equal(output_of(model, x), reference), method
        sdmerge.remove(model)
        assert torch.equal(output_of(model, x), reference), method
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards
    assert not model.base_model.embeddings._forward_hooks
    assert "_sdmerge_patch" not in model.base_model.__dict__


def test_remove_on_unpatched_model_is_a_no_op_and_reapply_replaces():
    model, x = tiny(ViTForImageClassification), images()
    reference = output_of(model, x)
    sdmerge.remove(model)
    assert torch.equal(output_of(model, x), reference)
    sdmerge.apply(model, "tome", tokens_per_block=2)
    sdmerge.apply(model, "tome", tokens_per_block=1)
    assert token_counts(model, x) == [16, 15, 14, 13]
    sdmerge.remove(model)
    assert torch.equal(output_of(model, x), reference)


def test_patched_model_deepcopies_into_an_independent_patch():
    model, x = tiny(ViTForImageClassification), images()
    sdmerge.apply(model, "tome", tokens_per_block=2)
    clone = copy.deepcopy(model)
    sdmerge.remove(model)
    assert token_counts(clone, x) == [15, 13, 11, 9]
    assert token_counts(model, x) == [17, 17, 17, 17]


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_follow_the_stage_schedule(method):
    model, x = tiny(ViTForImageClassification), images()
    fused = 1 if method == "evit" else 0  # EViT's fused token comes in addition to the K_s kept tokens
    # default stages of a 4-block model: blocks 1, 2, 3. K_s = floor(16 * 0.7^s) = 11, 7, 5 free tokens
    sdmerge.apply(model, method, r=0.7)
    assert token_counts(model, x) == [17, 12 + fused, 8 + fused, 6 + fused]
    # explicit stages (0-based): r=0.75 at blocks 0 and 2: floor(16 * 0.75) = 12, floor(16 * 0.5625) = 9
    sdmerge.apply(model, method, r=0.75, stages=(0, 2))
    assert token_counts(model, x) == [13 + fused, 13 + fused, 10 + fused, 10 + fused]


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_follow_the_per_block_schedules(method):
    model, x = tiny(DeiTForImageClassificationWithTeacher), images()  # 16 patches + 2 prefix tokens
    fused = 1 if method == "evit" else 0  # EViT: t tokens are fused, the fused token comes in addition
    sdmerge.apply(model, method, tokens_per_block=3)
    assert token_counts(model, x) == [15 + fused, 12 + 2 * fused, 9 + 3 * fused, 6 + 4 * fused]
    # ToMe's linear schedule, t=2, L=4: floor(4 - 4l/3) = 4, 2, 1, 0
    sdmerge.apply(model, method, tokens_per_block=2, schedule="linear")
    assert token_counts(model, x) == [14 + fused, 12 + 2 * fused, 11 + 3 * fused, 11 + 3 * fused]


def test_schedule_follows_the_token_count_of_each_call():
    model = tiny(ViTForImageClassification)
    sdmerge.apply(model, "tome", r=0.5)
    # 48x48 images with interpolated position embeddings: P = 36 patches -> 18 -> 9 -> floor(4.5) = 4, which
    # asks 5 of the split's 4 sources: ToMe's one-token rounding clamp keeps 5 (see the DeiT-S test below)
    assert token_counts(model, images(size=48), interpolate_pos_encoding=True) == [37, 19, 10, 6]
    assert token_counts(model, images()) == [17, 9, 5, 3]  # P = 16: 8, 4, 2


def test_default_stages_and_linear_schedule_at_paper_sizes():
    from sdmerge.methods import get_method
    from sdmerge.vit.schedule import default_stages, make_schedule

    assert default_stages(12) == (3, 6, 9)  # the 4th, 7th and 10th block
    assert default_stages(24) == (6, 12, 18)
    assert default_stages(4) == (1, 2, 3)
    # ToMe/ATC eq. 5 for ViT-B, t=16: floor(32 - 32l/11)
    linear = make_schedule(12, tokens_per_block=16, schedule="linear").per_block
    assert linear == (32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0)
    assert sum(linear) == 187  # 16 * 12 = 192 in the continuous schedule; floors lose 5
    # DeiT-S (196 patches + class token) at ToMe's 13 tokens per block keeps 197 - 156 = 41 tokens
    constant = make_schedule(12, tokens_per_block=13)
    assert constant.removals(197, 1) == (13,) * 12
    # stage keep rate 0.7 on 196 free tokens: 196 -> 137 -> 96 -> 67 (floor(196 * 0.7^s))
    assert make_schedule(12, 0.7).removals(197, 1) == (0, 0, 0, 59, 0, 0, 41, 0, 0, 29, 0, 0)
    # EViT's fused token comes in addition: 196 -> 137 + 1 -> 96 + 1 -> 67 + 1
    evit = get_method("evit", "vit")
    assert make_schedule(12, 0.7).removals(197, 1, evit) == (0, 0, 0, 59, 0, 0, 42, 0, 0, 30, 0, 0)


# "Which tokens to use?" section 3.1.2 and the reference codes: K_s = floor(P r^s), DeiT-S at 224 px (P = 196)
DEIT_S_STAGE_COUNTS = {0.25: (49, 12, 3), 0.5: (98, 49, 24), 0.7: (137, 96, 67), 0.9: (176, 158, 142)}


def test_stage_counts_are_floor_of_p_times_r_to_the_s():
    from fractions import Fraction

    from sdmerge.vit.schedule import make_schedule, stage_keep_counts

    for r, counts in DEIT_S_STAGE_COUNTS.items():
        assert stage_keep_counts(196, r, 3) == counts
        removals = make_schedule(12, r).removals(197, 1)  # blocks 3, 6, 9 remove down to K_1, K_2, K_3
        assert [196 - sum(removals[: b + 1]) for b in (3, 6, 9)] == list(counts)
    # products that are whole numbers in real arithmetic, which float pow may put just below them
    assert stage_keep_counts(100, 0.9, 2) == (90, 81)
    assert stage_keep_counts(1000, 0.9, 3) == (900, 810, 729)
    assert stage_keep_counts(1000, 0.3, 3) == (300, 90, 27)  # 1000 * 0.3**3 = 26.999999999999996 in float
    assert stage_keep_counts(196, 1.0, 3) == (196, 196, 196)
    # exact rational arithmetic agrees for every patch count up to 1024 and two-decimal keep rates
    for r in ("0.25", "0.3", "0.5", "0.55", "0.7", "0.75", "0.8", "0.9", "0.95", "0.99"):
        for patches in range(1, 1025):
            exact = tuple(int(patches * Fraction(r) ** s) for s in (1, 2, 3))
            assert stage_keep_counts(patches, float(r), 3) == exact, (patches, r)


def test_tome_stages_at_half_keep_rate_clamp_the_one_token_the_split_lacks():
    """floor(P r^s) at r >= 0.5 asks ToMe's split for at most one token more than its sources; that
    stage keeps one more token, as ToMe's code and the reference code do. Below 0.5: ValueError."""
    from sdmerge.methods import get_method
    from sdmerge.vit.schedule import make_schedule, removal_limit, stage_keep_counts

    tome, topk = get_method("tome", "vit"), get_method("topk", "vit")
    # DeiT-S, class token only: 196 -> 98 -> 49 -> floor(24.5) = 24 asks 25 of 24 sources; the stage keeps 25
    assert make_schedule(12, 0.5).removals(197, 1, tome) == (0, 0, 0, 98, 0, 0, 49, 0, 0, 24, 0, 0)
    assert make_schedule(12, 0.5).removals(197, 1, topk) == (0, 0, 0, 98, 0, 0, 49, 0, 0, 25, 0, 0)
    assert make_schedule(12, 0.5).removals(198, 2, tome)[9] == 25  # with a distillation token the split has 25
    for protected in (1, 2, 3):  # at r >= 0.5 the clamp is never more than one token
        for patches in range(8, 400, 7):
            for r in (0.5, 0.55, 0.6, 0.75, 0.9):
                removals = make_schedule(12, r).removals(patches + protected, protected, tome)
                tokens = patches
                for remove, kept in zip((removals[3], removals[6], removals[9]), stage_keep_counts(patches, r, 3)):
                    assert remove <= removal_limit(tome, tokens + protected, protected)
                    tokens -= remove
                    assert kept <= tokens <= kept + 1
    with pytest.raises(ValueError, match="remove 36 of 65 tokens in block 1.*at most 32"):  # r < 0.5: no clamp
        sdmerge.apply(tiny(ViTForImageClassification, image_size=64), "tome", r=0.45)


def test_stage_counts_that_reach_zero_tokens_are_refused():
    model = tiny(ViTForImageClassification)  # 16 patches: floor(16 * 0.2^s) = 3, 0, 0
    with pytest.raises(ValueError, match=r"keep rate 0.2 at blocks \[1, 2, 3\].*floor\(P r\^s\).*remove 3 of 4 tokens in "
                                         r"block 2.*at most 2"):
        sdmerge.apply(model, "topk", r=0.2)  # block 2 would keep none of the 3 free tokens


# --- CIS, proportional attention ---------------------------------------------------------------


def test_cis_merges_with_class_importance_from_the_same_attention_pass():
    model, x = tiny(ViTForImageClassification, attn="eager"), images()
    reference = model(x, output_attentions=True)
    probabilities = reference.attentions[0]  # [B, H, N, N], transformers' own eager attention of block 0
    layer = hf_layers(model)[0]
    parts = hf_parts(layer)

    sdmerge.apply(model, "cis", r=0.75, stages=(0,))  # 4 of 16 free tokens, in block 0
    seen = layer_io(model, 0, x)
    hidden = seen["layer_in"]
    _, _, keys, values = hand_attention(layer, layer.layernorm_before(hidden))
    # ToMeCIS eq. 7-8 by hand, as its code computes them: S_i = mean_h A[h, cls, i] * ||mean_h V[h, i]||_2
    weights = probabilities[:, :, 0, :].mean(dim=1) * values.mean(dim=1).norm(dim=-1)  # [B, N]
    residual = first(layer.attention(layer.layernorm_before(hidden))) + hidden  # the attention without bias
    plan = bipartite_soft_matching(keys.mean(dim=1), 4, *alternating_split(17, 1), order="split")
    merged = torch.zeros(x.shape[0], 13, 32)
    for b in range(x.shape[0]):
        for group in range(13):
            members = (plan.labels[b] == group).nonzero().squeeze(1)
            w = weights[b, members]
            merged[b, group] = (w[:, None] * residual[b, members]).sum(0) / w.sum()
    expected = parts.mlp(layer.layernorm_after(merged)) + merged
    torch.testing.assert_close(seen["layer_out"], expected, rtol=1e-5, atol=1e-5)
    # the same tokens merged by size (ToMe) give a different output: the weights matter here
    sdmerge.apply(model, "tome", r=0.75, stages=(0,))
    assert (layer_io(model, 0, x)["layer_out"] - expected).abs().max() > 1e-3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prop_attn", [True, False])
def test_proportional_attention_adds_log_size_to_the_logits(attn, prop_attn):
    model, x = tiny(ViTForImageClassification, attn=attn), images()
    sdmerge.apply(model, "tome", r=0.5, stages=(0,), prop_attn=prop_attn)
    seen = layer_io(model, 1, x)
    sizes = reduction_state(model).sizes  # only block 0 reduces: these are the sizes block 1 sees
    assert sizes.max() > 1
    layer = hf_layers(model)[1]
    bias = sizes.log()[:, None, None, :] if prop_attn else None
    expected, _, _, _ = hand_attention(layer, seen["attn_in"], bias)
    torch.testing.assert_close(seen["attn_out"], expected, rtol=1e-5, atol=1e-6)
    other, _, _, _ = hand_attention(layer, seen["attn_in"], None if prop_attn else sizes.log()[:, None, None, :])
    assert (seen["attn_out"] - other).abs().max() > 1e-4


def test_log_size_bias_equals_duplicated_keys():
    """Attention with key j counted s_j times == attention with + log(s_j): the meaning of proportional
    attention, for the fused attention the bias is given to and for the class-token row."""
    from sdmerge.vit.reduction import class_token_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    sizes = torch.tensor([[1, 3, 1, 2, 1], [2, 1, 1, 1, 4]], dtype=torch.float64)
    bias = sizes.log()[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.5)
    row = class_token_attention(q, k, 0.5, bias)  # [2, 3, 5]
    for b in range(2):
        repeats = sizes[b].long()
        kd, vd = k[b : b + 1].repeat_interleave(repeats, dim=2), v[b : b + 1].repeat_interleave(repeats, dim=2)
        torch.testing.assert_close(out[b : b + 1], torch.nn.functional.scaled_dot_product_attention(q[b : b + 1], kd, vd, scale=0.5))
        duplicated = ((q[b : b + 1, :, :1] @ kd.transpose(-1, -2)) * 0.5).softmax(dim=-1)[:, :, 0]  # [1, 3, 13]
        owner = torch.arange(5).repeat_interleave(repeats)
        summed = torch.zeros(1, 3, 5, dtype=torch.float64).index_add_(2, owner, duplicated)
        torch.testing.assert_close(row[b : b + 1].double(), summed)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", ["cis", "tome"])
def test_reducing_blocks_run_the_models_own_attention(attn, method):
    model, x = tiny(ViTForImageClassification, attn=attn), images()
    standard = layer_io(model, 2, x)["attn_out"]
    sdmerge.apply(model, method, r=0.7, stages=(2,))  # block 2 reduces (cis: also reads A_cls), blocks 0-1 are plain
    assert torch.equal(layer_io(model, 2, x)["attn_out"], standard)


# --- ATC, protected tokens, provenance ---------------------------------------------------------


@pytest.mark.parametrize("method", ["atc_single", "atc_complete", "atc_average"])
def test_atc_partitions_equal_scipy_on_the_same_keys(method):
    model, x = tiny(ViTForImageClassification, num_hidden_layers=2, image_size=48), images(batch=4, size=48)  # 36 patches
    sdmerge.apply(model, method, r=0.5, stages=(1,))
    seen = layer_io(model, 1, x)
    layer = hf_layers(model)[1]
    _, _, keys, _ = hand_attention(layer, layer.layernorm_before(seen["layer_in"]))
    distances = cosine_distances(keys.mean(dim=1)[:, 1:].detach())  # free tokens, float64
    labels = reduction_state(model).provenance.labels
    assert torch.equal(labels[:, 0], torch.zeros(4, dtype=torch.int64))
    for b in range(4):
        d = distances[b].numpy()
        reference = fcluster(linkage(squareform(d, checks=False), method[4:]), 18, "maxclust")
        ours = labels[b, 1:].numpy()
        assert len(np.unique(ours)) == 18
        # same partition: a bijection between cluster ids
        assert len({(a, o) for a, o in zip(reference, ours)}) == 18


@pytest.mark.parametrize("method", METHODS)
def test_deit_class_and_distillation_tokens_are_protected(method):
    model, x = tiny(DeiTForImageClassificationWithTeacher), images()
    sdmerge.apply(model, method, tokens_per_block=3)
    out = model(x)
    state = reduction_state(model)
    labels = state.provenance.labels  # [B, 18] original token -> final token
    assert torch.equal(labels[:, :2], torch.tensor([[0, 1]] * 3))
    assert ((labels[:, 2:] != 0) & (labels[:, 2:] != 1)).all()
    assert torch.equal(state.sizes[:, :2], torch.ones(3, 2))
    if method in ("topk", "evit"):  # pruning: every token keeps size 1, EViT's fused tokens included
        assert torch.equal(state.sizes, torch.ones(3, state.sizes.shape[1]))
    else:
        assert torch.equal(state.provenance.merged_sizes, state.sizes)
    if method == "evit":  # the provenance holds every patch: the fused tokens hold the patches fused into them
        assert torch.equal(state.provenance.merged_sizes.sum(dim=1), torch.full((3,), 18.0))
        assert state.provenance.merged_sizes.max() > 1
    # the teacher model still averages the heads of the class and distillation tokens
    hidden = model.base_model(x).last_hidden_state
    assert hidden.shape[1] == 18 - 12 + (4 if method == "evit" else 0)  # EViT: one fused token after each block
    torch.testing.assert_close(out.cls_logits, model.cls_classifier(hidden[:, 0]))
    torch.testing.assert_close(out.distillation_logits, model.distillation_classifier(hidden[:, 1]))
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2)


def test_sizes_add_up_and_state_is_renewed_every_call():
    model = tiny(ViTForImageClassification)
    sdmerge.apply(model, "tome", tokens_per_block=3)
    model(images(batch=3))
    first = reduction_state(model)
    assert torch.equal(first.sizes.sum(dim=1), torch.full((3,), 16.0 + 1))
    model(images(batch=2, seed=5))
    second = reduction_state(model)
    assert second is not first and second.sizes.shape == (2, 17 - 12)


@pytest.mark.parametrize("cls", [ViTForImageClassification, DeiTForImageClassificationWithTeacher])
def test_provenance_after_a_block_on_the_installed_layer_layout(cls):
    """sdmerge.plan_recording.vit_provenance_after finds the layers in either layout (this file
    also runs on transformers 4.50, whose layers are base_model.encoder.layer)."""
    from sdmerge.plan_recording import vit_provenance_after

    model, x = tiny(cls, num_hidden_layers=4), images(batch=2)
    protected = 2 if cls is DeiTForImageClassificationWithTeacher else 1
    sdmerge.apply(model, "atc_average", r=0.5, stages=(1, 3))
    assert sdmerge.vit.blocks(model) is hf_layers(model)
    assert vit_provenance_after(model, x, 0) is None
    after_1, after_3 = vit_provenance_after(model, x, 1), vit_provenance_after(model, x, 3)
    assert after_1.labels.shape == (2, 16 + protected) and after_1.num_groups == protected + 8
    assert after_3.num_groups == protected + 4
    assert torch.equal(after_3.labels, reduction_state(model).provenance.labels)
    with pytest.raises(ValueError, match=r"block=4 must be an int in \[0, 4\)"):
        vit_provenance_after(model, x, 4)


# --- errors ------------------------------------------------------------------------------------


def test_unsupported_model_is_a_type_error_naming_what_is_supported():
    with pytest.raises(TypeError, match=r"torch.nn.modules.linear.Linear.*ViTForImageClassification"):
        sdmerge.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="DeiTModel"):
        sdmerge.remove(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(method="nope"), "unknown method 'nope'.*tome"),
        (dict(method="tome", r=0.7, tokens_per_block=2), "ambiguous request: r=0.7"),
        (dict(method="tome", r=0.5, tokens_per_block=2), "ambiguous request: r=0.5"),  # explicit r, even the default value
        (dict(method="tome", stages=(1,), tokens_per_block=2), "ambiguous request: stages"),
        (dict(method="tome", schedule="linear"), "pass tokens_per_block"),
        (dict(method="tome", tokens_per_block=2, schedule="cosine"), "schedule='cosine' is not allowed; allowed: 'constant', 'linear'"),
        (dict(method="tome", tokens_per_block=-1), "tokens_per_block=-1"),
        (dict(method="tome", r=1.5), "outside the allowed range"),
        (dict(method="tome", r=0.7, stages=(4,)), r"stages \[4\] are outside the model's blocks 0..3"),
        (dict(method="tome", r=0.7, stages=(1, 1)), "repeats a block"),
        (dict(method="tome", r=0.25), "remove 12 of 17 tokens in block 1.*at most 8"),
        (dict(method="tome", tokens_per_block=5), "remove 5 of 7 tokens in block 2.*at most 3"),
        (dict(method="topk", tokens_per_block=6), "remove 6 of 5 tokens in block 2.*at most 3"),
    ],
)
def test_bad_requests_raise_clear_errors(options, message):
    model, x = tiny(ViTForImageClassification), images()
    reference = output_of(model, x)
    with pytest.raises(ValueError, match=message):
        sdmerge.apply(model, **options)
    assert torch.equal(output_of(model, x), reference)  # nothing was left half-patched


def test_options_of_the_wrong_type_or_name_raise_type_errors_listing_the_options():
    model = tiny(ViTForImageClassification)
    with pytest.raises(TypeError, match="prop_attn must be True or False, got 'yes'"):
        sdmerge.apply(model, "tome", prop_attn="yes")
    with pytest.raises(TypeError, match=r"stages=\(1.0,\) must hold at least one block index, each an int"):
        sdmerge.apply(model, "tome", r=0.7, stages=(1.0,))
    accepted = (r"unknown option max_downsample for ViT/DeiT classifiers; accepted options: stages: range or sequence of "
                r"ints or None = None; tokens_per_block: int >= 0 or None = None; schedule: .*; prop_attn: bool = True")
    with pytest.raises(TypeError, match=accepted):
        sdmerge.apply(model, "tome", max_downsample=2)


def test_default_stages_need_four_blocks():
    model = tiny(ViTForImageClassification, num_hidden_layers=3)
    with pytest.raises(ValueError, match="at least 4 blocks.*0..2"):
        sdmerge.apply(model, "tome", r=0.7)
    sdmerge.apply(model, "tome", r=0.7, stages=(1,))
    assert token_counts(model, images()) == [17, 12, 12]  # floor(16 * 0.7) = 11 free tokens


def test_prop_attn_is_refused_where_the_attention_cannot_take_a_bias():
    model = tiny(ViTForImageClassification)
    model.config._attn_implementation = "flash_attention_2"  # as a loaded flash-attention model reports it
    with pytest.raises(ValueError, match="'flash_attention_2' cannot take;.*prop_attn=False"):
        sdmerge.apply(model, "tome", r=0.7)
    sdmerge.apply(model, "tome", r=0.7, prop_attn=False)  # fine without the bias
    sdmerge.apply(model, "evit", r=0.7)  # pruning: every token has size 1, there is no bias to add


def test_attention_mask_is_refused_on_a_patched_model():
    model, x = tiny(ViTForImageClassification), images()
    sdmerge.apply(model, "tome", r=0.7)
    if hasattr(model.base_model, "layers"):  # transformers >= 5.9: a padding mask
        with pytest.raises(ValueError, match="attention_mask cannot follow merged tokens"):
            model(x, attention_mask=torch.ones(3, 17).index_fill(1, torch.tensor([5]), 0))
    elif "head_mask" in inspect.signature(type(hf_layers(model)[0]).forward).parameters:  # 4.x: a head mask
        with pytest.raises(ValueError, match="head_mask cannot follow merged tokens"):
            model(x, head_mask=torch.ones(4))
    eager = sdmerge.apply(tiny(ViTForImageClassification, attn="eager"), "tome", tokens_per_block=2)
    if "output_attentions" in inspect.signature(type(hf_layers(model)[0]).forward).parameters:  # 4.x before 4.56
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            eager(x, output_attentions=True)
    else:  # recorded from the attention modules: the maps shrink with the tokens
        assert [a.shape[-1] for a in eager(x, output_attentions=True).attentions] == [17, 15, 13, 11]


def test_removal_limit_is_exactly_what_the_core_accepts():
    from sdmerge.methods import get_method
    from sdmerge.vit.schedule import removal_limit

    g = torch.Generator().manual_seed(0)
    for name in METHODS:
        method = get_method(name, "vit")
        for num_tokens, protected in [(17, 1), (18, 2), (10, 1), (9, 2)]:
            metric = torch.randn(2, num_tokens, 8, generator=g)
            importance = torch.rand(2, num_tokens, generator=g)
            limit = removal_limit(method, num_tokens, protected)

            def plan(remove):
                return method.plan(
                    metric, remove, protected=protected, importance=importance, split=alternating_split(num_tokens, protected)
                )

            assert plan(limit).num_groups == num_tokens - limit + method.fused_tokens
            with pytest.raises(ValueError):
                plan(limit + 1)


@pytest.mark.parametrize("method", ["crucial", "topk", "evit"])
def test_selection_methods_rank_tokens_by_class_attention(method):
    model, x = tiny(ViTForImageClassification, attn="eager"), images()
    class_attention = model(x, output_attentions=True).attentions[0][:, :, 0, 1:].mean(dim=1)  # [B, 16], unpatched
    sdmerge.apply(model, method, r=0.75, stages=(0,))  # block 0 keeps floor(16 * 0.75) = 12 free tokens
    model(x)
    labels = reduction_state(model).provenance.labels[:, 1:]  # [B, 16] free token -> group (13 = dropped)
    for b in range(x.shape[0]):
        top = set(class_attention[b].argsort(descending=True)[:12].tolist())  # EViT's fused token comes in addition
        groups = {i: labels[b, i].item() for i in range(16)}
        if method == "topk":
            assert {i for i, g in groups.items() if g != 13} == top
        elif method == "evit":
            assert all(len([j for j in groups if groups[j] == groups[i]]) == 1 for i in top)
            rest = {groups[i] for i in set(range(16)) - top}
            assert rest == {13}  # the 4 least attended tokens are fused into one token, the last
        else:  # crucial: every group holds exactly one of the most attended tokens
            assert sorted(groups[i] for i in top) == sorted(set(groups.values()))


def test_class_attention_of_later_blocks_includes_the_size_bias(monkeypatch):
    import sdmerge.vit.reduction as token_reduction

    model, x = tiny(ViTForImageClassification), images()
    seen_rows = []
    original = token_reduction.class_importance
    monkeypatch.setattr(
        token_reduction, "class_importance", lambda m, row, *rest: seen_rows.append(row) or original(m, row, *rest)
    )
    sdmerge.apply(model, "cis", r=0.75, stages=(0, 2))
    seen = layer_io(model, 2, x)
    bias = seen["attn_mask"]  # log(sizes) after block 0, given to block 2's attention
    assert bias is not None and bias.max() > 0
    _, probabilities, _, _ = hand_attention(hf_layers(model)[2], seen["attn_in"], bias)
    assert len(seen_rows) == 2
    torch.testing.assert_close(seen_rows[1], probabilities[:, :, 0].float(), rtol=1e-5, atol=1e-6)


def test_a_vit_apply_imports_no_diffusers():
    """Integrations are asked only once their model library is imported: a ViT's apply imports no
    diffusers (which need not be installed, e.g. next to transformers 4). CI runs the same script
    against the installed wheel alone."""
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_wheel.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    checked, error = done.stdout.splitlines()
    assert checked.endswith("diffusers not imported") and str(ROOT / "sdmerge") in checked
    assert "torch.nn.modules.linear.Linear; supported: ViTModel" in error
    assert error.endswith("diffusers models (diffusers is not imported); timm models (timm is not imported)")
