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
    # default stages of a 4-block model: blocks 1, 2, 3. Free tokens 16 -> 16-4=12 -> 12-3=9 -> 9-2=7
    sdmerge.apply(model, method, r=0.7)
    assert token_counts(model, x) == [17, 13, 10, 8]
    # explicit stages (0-based): r=0.75 at blocks 0 and 2: 16 -> 12 -> 9
    sdmerge.apply(model, method, r=0.75, stages=(0, 2))
    assert token_counts(model, x) == [13, 13, 10, 10]


@pytest.mark.parametrize("method", METHODS)
def test_token_counts_follow_the_per_block_schedules(method):
    model, x = tiny(DeiTForImageClassificationWithTeacher), images()  # 16 patches + 2 prefix tokens
    sdmerge.apply(model, method, tokens_per_block=3)
    assert token_counts(model, x) == [15, 12, 9, 6]
    # ToMe's linear schedule, t=2, L=4: floor(4 - 4l/3) = 4, 2, 1, 0
    sdmerge.apply(model, method, tokens_per_block=2, schedule="linear")
    assert token_counts(model, x) == [14, 12, 11, 11]


def test_schedule_follows_the_token_count_of_each_call():
    model = tiny(ViTForImageClassification)
    sdmerge.apply(model, "tome", r=0.5)
    # 48x48 images with interpolated position embeddings: 36 patches -> 18 -> 9 -> 5 free tokens
    assert token_counts(model, images(size=48), interpolate_pos_encoding=True) == [37, 19, 10, 6]
    assert token_counts(model, images()) == [17, 9, 5, 3]


def test_default_stages_and_linear_schedule_at_paper_sizes():
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
    # stage keep rate 0.7 on 196 free tokens: 196 -> 138 -> 97 -> 68
    assert make_schedule(12, 0.7).removals(197, 1) == (0, 0, 0, 58, 0, 0, 41, 0, 0, 29, 0, 0)


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
    assert torch.equal(state.provenance.merged_sizes, state.sizes)
    # the teacher model still averages the heads of the class and distillation tokens
    hidden = model.base_model(x).last_hidden_state
    assert hidden.shape[1] == 18 - 12
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
        (dict(method="tome", tokens_per_block=2, schedule="cosine"), "unknown schedule 'cosine'.*constant, linear"),
        (dict(method="tome", tokens_per_block=-1), "tokens_per_block=-1"),
        (dict(method="tome", r=1.5), "outside the allowed range"),
        (dict(method="tome", r=0.7, stages=(4,)), r"stages \[4\] are outside the model's blocks 0..3"),
        (dict(method="tome", r=0.7, stages=(1, 1)), "repeats a block"),
        (dict(method="tome", r=0.7, stages=(1.0,)), "int block indices"),
        (dict(method="tome", r=0.25), "remove 12 of 17 tokens in block 1.*at most 8"),
        (dict(method="tome", tokens_per_block=5), "remove 5 of 7 tokens in block 2.*at most 3"),
        (dict(method="topk", tokens_per_block=6), "remove 6 of 5 tokens in block 2.*at most 3"),
        (dict(method="tome", prop_attn="yes"), "prop_attn='yes'"),
    ],
)
def test_bad_requests_raise_clear_errors(options, message):
    model, x = tiny(ViTForImageClassification), images()
    reference = output_of(model, x)
    with pytest.raises(ValueError, match=message):
        sdmerge.apply(model, **options)
    assert torch.equal(output_of(model, x), reference)  # nothing was left half-patched


def test_default_stages_need_four_blocks():
    model = tiny(ViTForImageClassification, num_hidden_layers=3)
    with pytest.raises(ValueError, match="at least 4 blocks.*0..2"):
        sdmerge.apply(model, "tome", r=0.7)
    sdmerge.apply(model, "tome", r=0.7, stages=(1,))
    assert token_counts(model, images()) == [17, 13, 13]


def test_prop_attn_is_refused_where_the_attention_cannot_take_a_bias():
    model = tiny(ViTForImageClassification)
    model.config._attn_implementation = "flash_attention_2"  # as a loaded flash-attention model reports it
    with pytest.raises(ValueError, match="'flash_attention_2' cannot take;.*prop_attn=False"):
        sdmerge.apply(model, "tome", r=0.7)
    sdmerge.apply(model, "tome", r=0.7, prop_attn=False)  # fine without the bias


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

            assert plan(limit).num_groups == num_tokens - limit
            with pytest.raises(ValueError):
                plan(limit + 1)


@pytest.mark.parametrize("method", ["crucial", "topk", "evit"])
def test_selection_methods_rank_tokens_by_class_attention(method):
    model, x = tiny(ViTForImageClassification, attn="eager"), images()
    class_attention = model(x, output_attentions=True).attentions[0][:, :, 0, 1:].mean(dim=1)  # [B, 16], unpatched
    sdmerge.apply(model, method, r=0.75, stages=(0,))  # block 0 removes 4 of 16 free tokens
    model(x)
    labels = reduction_state(model).provenance.labels[:, 1:]  # [B, 16] free token -> group (13 = dropped)
    kept = 12 if method != "evit" else 11  # EViT's fused token counts toward the 12
    for b in range(x.shape[0]):
        top = set(class_attention[b].argsort(descending=True)[:kept].tolist())
        groups = {i: labels[b, i].item() for i in range(16)}
        if method == "topk":
            assert {i for i, g in groups.items() if g != 13} == top
        elif method == "evit":
            assert all(len([j for j in groups if groups[j] == groups[i]]) == 1 for i in top)
            rest = {groups[i] for i in set(range(16)) - top}
            assert len(rest) == 1  # the 5 least attended tokens are fused into one
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
