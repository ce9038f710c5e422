"""The reference codes' rules, against direct reimplementations written here from their descriptions.

**Counts.** Stage protocol ("Which tokens to use?" 3.1.2, its code, EViT's and ATC's code): after
the ``s``-th stage ``K_s = floor(P r^s)`` free tokens are kept, ``P`` the free tokens entering the
first stage (computed here in exact rational arithmetic). Per-block protocol (ToMe): ``t`` tokens
leave the kept set in every block (``floor(2t - 2tl/(L-1))`` for the linear schedule).

**ToMe's token order** (ToMe's ViT implementation, and the ToMeCIS code built on it): in every
reducing block split the current tokens into A (even positions) and B (odd positions), the
protected class / distillation tokens in neither; each A token picks its most similar B token
(cosine similarity of the keys averaged over heads); the ``r`` best A tokens merge into their B
token (weighted average: sizes for ``tome``, the class importance score for ``cis``; sizes add
up); the output order is the protected tokens, the unmerged A tokens, then all B tokens, each in
ascending current position. The next block splits that order.

**ATC**: average-linkage clustering (scipy) of the free tokens' head-averaged keys by cosine
distance into ``K`` clusters, size-weighted means, sizes add up.

**Top-K / EViT**: ``a`` = the class token's attention row averaged over heads (softmax over all
tokens); the ``K`` free tokens with the largest ``a`` are kept, the others dropped (Top-K) or
fused into one extra token ``sum_i a_i x_i`` (EViT; the paper's reading divides by ``sum_i a_i``),
which is an ordinary token afterwards: size 1, no proportional-attention bias, kept or fused by
its attention in later stages like any other token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist
from tests.torchvision_stand_in import import_timm
from tests.vit_layout import hf_layers, hf_parts
from torch import Tensor
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

import sdmerge
from sdmerge.core import bipartite_soft_matching
from sdmerge.methods import get_method
from sdmerge.vit import reduction_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")
timm = import_timm()
DEPTH = 12


# --- the order, by hand --------------------------------------------------------------------------


def unit(degrees: list[float]) -> Tensor:
    angles = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([angles.cos(), angles.sin()], dim=-1)[None]  # [1, N, 2]


def test_token_order_after_two_reductions_by_hand():
    split = get_method("tome", "vit")
    # 7 tokens, class token 0 protected. A = {2, 4, 6}, B = {1, 3, 5}. 6 ~ 1 (3 deg), 2 ~ 5 (5 deg), 4 is far.
    first_metric = unit([0, 100, 200, 300, 250, 205, 103])
    first = split.plan(first_metric, 2, protected=1, split=(torch.tensor([2, 4, 6]), torch.tensor([1, 3, 5])), split_order=True)
    # class, unmerged A (4), then B in ascending position: 1 (+6), 3, 5 (+2)
    assert first.labels.tolist() == [[0, 2, 4, 3, 1, 4, 2]]
    # order="position" (the Stable Diffusion path's) numbers groups by their destination's position: 0, 1, 3, 4, 5
    assert bipartite_soft_matching(first_metric, 2, torch.tensor([2, 4, 6]), torch.tensor([1, 3, 5])).labels.tolist() == [
        [0, 1, 4, 2, 3, 4, 1]
    ]
    # second block, over the new order [cls, 4, 1+6, 3, 5+2]: A = {2, 4} = {1+6, 5+2}, B = {1, 3} = {4, 3}
    second_metric = unit([0, 15, 10, 90, 180])  # 1+6 ~ token 4 (5 deg); 5+2 is far from both
    second = split.plan(second_metric, 1, protected=1, split=(torch.tensor([2, 4]), torch.tensor([1, 3])), split_order=True)
    assert second.labels.tolist() == [[0, 2, 2, 3, 1]]  # class, unmerged 5+2, then 4 (+1+6), 3
    provenance = first.then(second)
    assert provenance.labels.tolist() == [[0, 2, 1, 3, 2, 1, 2]]
    assert provenance.merged_sizes.tolist() == [[1, 2, 3, 1]]
    with pytest.raises(ValueError, match="'atc_average' has no source/destination split"):
        get_method("atc_average", "vit").plan(first_metric, 2, protected=1, split_order=True)
    with pytest.raises(ValueError, match="unknown group order 'ref'.*position, split"):
        bipartite_soft_matching(first_metric, 2, torch.tensor([2, 4, 6]), torch.tensor([1, 3, 5]), order="ref")


# --- a direct reimplementation of the reference forward ------------------------------------------


@dataclass
class Block:
    """One pre-norm ViT block as plain functions: ``qkv(h) -> q, k, v [B, H, N, Dh]``."""

    norm1: Callable
    qkv: Callable
    proj: Callable
    norm2: Callable
    mlp: Callable


def hf_blocks(model) -> list[Block]:
    blocks = []
    for layer in hf_layers(model):
        p = hf_parts(layer)

        def qkv(h, p=p):
            B, N, _ = h.shape
            return [f(h).view(B, N, p.heads, -1).transpose(1, 2) for f in (p.query, p.key, p.value)]

        blocks.append(Block(p.layernorm_before, qkv, p.output, p.layernorm_after, p.mlp))
    return blocks


def timm_blocks(model) -> list[Block]:
    def qkv(h, attn):
        B, N, _ = h.shape
        return attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    return [Block(b.norm1, lambda h, a=b.attn: qkv(h, a), b.attn.proj, b.norm2, b.mlp) for b in model.blocks]


def reference_merge(x, sizes, weights, metric, members, remove: int, protected: int, reference_order: bool = True):
    """One reduction of ``x: [B, N, C]`` by the rule above; ``members``: original tokens per token."""
    rows_x, rows_sizes, rows_members = [], [], []
    for b in range(x.shape[0]):
        n = x.shape[1]
        a = [i for i in range(protected, n) if i % 2 == 0]
        d = [i for i in range(protected, n) if i % 2 == 1]
        unit_metric = metric[b] / metric[b].norm(dim=-1, keepdim=True)
        best, choice = (unit_metric[a] @ unit_metric[d].T).max(dim=-1)
        ranked = best.argsort(descending=True).tolist()
        merged, kept = ranked[:remove], sorted(ranked[remove:])
        total = x[b, d] * weights[b, d, None]
        weight, size = weights[b, d].clone(), sizes[b, d].clone()
        group = [set(members[b][j]) for j in d]
        for s in merged:
            target = choice[s].item()
            total[target] += x[b, a[s]] * weights[b, a[s]]
            weight[target] += weights[b, a[s]]
            size[target] += sizes[b, a[s]]
            group[target] |= members[b][a[s]]
        tokens = [(i, x[b, i], sizes[b, i], members[b][i]) for i in range(protected)]
        tokens += [(a[s], x[b, a[s]], sizes[b, a[s]], members[b][a[s]]) for s in kept]
        tokens += [(j, total[k] / weight[k], size[k], group[k]) for k, j in enumerate(d)]
        if not reference_order:  # another order, to show the order matters: by each token's first original token
            tokens.sort(key=lambda token: min(token[3]))
        rows_x.append(torch.stack([t[1] for t in tokens]))
        rows_sizes.append(torch.stack([t[2] for t in tokens]))
        rows_members.append([t[3] for t in tokens])
    return torch.stack(rows_x), torch.stack(rows_sizes), rows_members


def reference_cluster(x, sizes, metric, members, keep: int, protected: int):
    """ATC with average linkage: ``keep`` clusters of the free tokens, ordered by their first token."""
    rows_x, rows_sizes, rows_members = [], [], []
    for b in range(x.shape[0]):
        free = metric[b, protected:].double().numpy()
        labels = fcluster(linkage(pdist(free, "cosine"), "average"), keep, "maxclust")
        clusters = sorted(([protected + i for i in range(len(labels)) if labels[i] == c] for c in set(labels)), key=min)
        groups = [[i] for i in range(protected)] + clusters
        w = sizes[b]
        rows_x.append(torch.stack([(w[g, None] * x[b, g]).sum(0) / w[g].sum() for g in groups]))
        rows_sizes.append(torch.stack([w[g].sum() for g in groups]))
        rows_members.append([set().union(*(members[b][i] for i in g)) for g in groups])
    return torch.stack(rows_x), torch.stack(rows_sizes), rows_members


def reference_prune(x, attention_row, members, keep: int, protected: int, fuse: bool, average: bool):
    """Top-K (``fuse=False``) or EViT: keep the ``keep`` free tokens with the largest ``attention_row``
    ``[B, N]`` (in their order), EViT appending ``sum_i a_i x_i`` of the others (``/ sum_i a_i``
    with ``average``). Every token has size 1."""
    rows_x, rows_members = [], []
    for b in range(x.shape[0]):
        a = attention_row[b]
        ranked = sorted(range(protected, x.shape[1]), key=lambda i: -a[i].item())
        kept, pruned = sorted(ranked[:keep]), ranked[keep:]
        order = list(range(protected)) + kept
        tokens, groups = [x[b, i] for i in order], [members[b][i] for i in order]
        if fuse:
            fused = (a[pruned, None] * x[b, pruned]).sum(0)
            tokens.append(fused / a[pruned].sum() if average else fused)
            groups.append(set().union(*(members[b][i] for i in pruned)))
        rows_x.append(torch.stack(tokens))
        rows_members.append(groups)
    x = torch.stack(rows_x)
    return x, torch.ones(x.shape[:2]), rows_members


def reference_forward(blocks, x, kept_after, protected, method, cis_score="code", evit_fusion="code", reference_order=True):
    """The reduced forward pass of ``blocks`` on embedded tokens ``x: [B, N, C]`` (proportional
    attention, reduction after the attention residual). ``kept_after(block, free)``: the free tokens
    kept in ``block`` (``None``: it does not reduce). Returns tokens, sizes and members."""
    B, N, _ = x.shape
    sizes = torch.ones(B, N)
    members = [[{i} for i in range(N)] for _ in range(B)]
    for index, block in enumerate(blocks):
        q, k, v = block.qkv(block.norm1(x))
        attention = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + sizes.log()[:, None, None, :]).softmax(dim=-1)
        x = x + block.proj((attention @ v).transpose(1, 2).reshape(B, x.shape[1], -1))
        keep = kept_after(index, x.shape[1] - protected)
        if keep is not None:
            remove = x.shape[1] - protected - keep
            if method in ("topk", "evit"):
                x, sizes, members = reference_prune(
                    x, attention[:, :, 0].mean(dim=1), members, keep, protected, method == "evit", evit_fusion == "paper"
                )
            elif method == "atc_average":
                x, sizes, members = reference_cluster(x, sizes, k.mean(dim=1), members, keep, protected)
            else:
                if method == "tome":
                    weights = sizes
                elif cis_score == "code":  # mean_h(A_cls) * ||mean_h(V)||
                    weights = attention[:, :, 0].mean(dim=1) * v.mean(dim=1).norm(dim=-1)
                else:  # mean_h(A_cls * ||V||)
                    weights = (attention[:, :, 0] * v.norm(dim=-1)).mean(dim=1)
                x, sizes, members = reference_merge(
                    x, sizes, weights, k.mean(dim=1), members, remove, protected, reference_order
                )
        x = x + block.mlp(block.norm2(x))
    return x, sizes, members


# --- the models ----------------------------------------------------------------------------------

IMAGE = 64  # 8x8 patches of 8 pixels: 64 tokens plus the prefix, enough for 12 reducing blocks
TINY_HF = dict(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=DEPTH, num_attention_heads=4,
               intermediate_size=64, num_labels=10)
TINY_TIMM = dict(img_size=IMAGE, patch_size=8, embed_dim=32, depth=DEPTH, num_heads=4, mlp_ratio=2.0, num_classes=10)


def randomise_prefix(model):
    with torch.no_grad():  # some libraries initialise class/distillation tokens and positions to zero
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("token", "pos_embed", "position_embeddings")):
                parameter.normal_(std=0.5)
    return model


def hf_vit():
    model = randomise_prefix(ViTForImageClassification(ViTConfig(**TINY_HF)).eval())

    def head(h, sizes):
        return model.classifier(model.base_model.layernorm(h)[:, 0])

    return model, model.base_model.embeddings, hf_blocks(model), 1, head


def hf_deit():
    model = randomise_prefix(DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY_HF)).eval())

    def head(h, sizes):
        h = model.base_model.layernorm(h)
        return (model.cls_classifier(h[:, 0]) + model.distillation_classifier(h[:, 1])) / 2

    return model, model.base_model.embeddings, hf_blocks(model), 2, head


def timm_model(distilled=False, **options):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = randomise_prefix((VisionTransformerDistilled if distilled else VisionTransformer)(**TINY_TIMM, **options).eval())
    prefix = model.num_prefix_tokens

    def embed(images):
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))

    def head(h, sizes):
        h = model.norm(h)
        if distilled:
            return (model.head(h[:, 0]) + model.head_dist(h[:, 1])) / 2
        if model.global_pool == "avg":  # a merged token standing for s patches counts s times
            pooled = (h[:, prefix:] * sizes[:, prefix:, None]).sum(dim=1) / sizes[:, prefix:].sum(dim=1, keepdim=True)
        else:
            pooled = h[:, 0]
        return model.head(model.fc_norm(pooled))

    return model, embed, timm_blocks(model), prefix, head


MODELS = {
    "hf ViT": hf_vit,
    "hf DeiT distilled": hf_deit,
    "timm ViT": lambda: timm_model(),
    "timm ViT avg pool": lambda: timm_model(global_pool="avg"),
    "timm DeiT distilled": lambda: timm_model(distilled=True),
}
SCHEDULES = {
    "constant": dict(tokens_per_block=4),
    "linear": dict(tokens_per_block=3, schedule="linear"),
    "stages": dict(r=0.6, stages=(2, 5, 8)),
}


def stage_counts(patches: int, r: float, stages) -> dict[int, int]:
    """``{block: K_s}``, ``K_s = floor(P r^s)`` in exact arithmetic (``r`` as its decimal)."""
    return {block: math.floor(patches * Fraction(str(r)) ** s) for s, block in enumerate(stages, start=1)}


def kept_after_rule(options, patches: int) -> Callable:
    """``kept_after(block, free)`` of a schedule's options, from the protocols' formulas."""
    if "r" in options:
        return lambda block, free, counts=stage_counts(patches, options["r"], options["stages"]): counts.get(block)
    t, L = options["tokens_per_block"], DEPTH
    linear = options.get("schedule") == "linear"

    def kept_after(block, free):
        leaving = math.floor(2 * t - Fraction(2 * t * block, L - 1)) if linear else t  # floor(2t - 2tl/(L-1))
        return free - leaving if leaving else None

    return kept_after


def build(name):
    if name.startswith("timm") and timm is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    torch.manual_seed(0)
    return MODELS[name]()


def images(batch=2):
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))


def reference_run(name, method, options, **rule):
    model, embed, blocks, protected, head = build(name)
    x = images()
    kept_after = kept_after_rule(options, 64)
    with torch.no_grad():
        tokens, sizes, members = reference_forward(blocks, embed(x), kept_after, protected, method, **rule)
        expected = head(tokens, sizes)
    return model, x, expected, sizes, members


def patched_logits(model, x, method, **options):
    sdmerge.apply(model, method, **options)
    with torch.no_grad():
        logits = model(x)
    return getattr(logits, "logits", logits)


def test_the_reference_schedules_reduce_in_several_blocks():
    """The order, the stage counts and EViT's fused token all matter only once several blocks reduce."""
    reducing = {name: [kept_after_rule(options, 64)(block, 64) for block in range(DEPTH)]
                for name, options in SCHEDULES.items()}
    assert reducing["stages"] == [None, None, 38, None, None, 23, None, None, 13, None, None, None]  # 64 * 0.6^s
    assert reducing["constant"] == [60] * DEPTH
    # floor(6 - 6l/11) = 6, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0 tokens leave
    assert reducing["linear"] == [58, 59, 60, 60, 61, 61, 62, 62, 63, 63, None, None]


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["tome", "cis", "atc_average", "topk", "evit"])
def test_logits_equal_the_reference_rule(method, name, schedule):
    options = SCHEDULES[schedule]
    model, x, expected, sizes, members = reference_run(name, method, options)
    torch.testing.assert_close(patched_logits(model, x, method, **options), expected, rtol=1e-5, atol=1e-5)
    state = reduction_state(model)
    torch.testing.assert_close(state.sizes, sizes)
    num_tokens = state.provenance.num_tokens
    labels = [[next((j for j, group in enumerate(row) if i in group), len(row)) for i in range(num_tokens)]
              for row in members]  # Top-K's pruned tokens: label len(row)
    assert state.provenance.labels.tolist() == labels  # provenance (and so the order) follows the tokens


@pytest.mark.parametrize("name", ["hf ViT", "timm DeiT distilled"])
def test_cis_score_formulas_and_the_order_change_the_logits(name):
    options = SCHEDULES["constant"]
    model, x, paper, _, _ = reference_run(name, "cis", options, cis_score="paper")
    torch.testing.assert_close(patched_logits(model, x, "cis", cis_score="paper", **options), paper, rtol=1e-5, atol=1e-5)
    # the checks can fail: the code's formula, and another token order, give logits 10x the tolerance away
    _, _, code, _, _ = reference_run(name, "cis", options, cis_score="code")
    _, _, position_order, _, _ = reference_run(name, "cis", options, reference_order=False)
    assert (code - paper).abs().max() > 1e-4
    assert (code - position_order).abs().max() > 1e-4


def test_formula_options_are_validated():
    model = hf_vit()[0]
    with pytest.raises(ValueError, match="cis_score='mean' is not allowed; allowed: 'code', 'paper'"):
        sdmerge.apply(model, "cis", cis_score="mean")
    with pytest.raises(ValueError, match="cis_score='paper' applies to method 'cis' only, not 'tome'"):
        sdmerge.apply(model, "tome", cis_score="paper")
    with pytest.raises(ValueError, match="evit_fusion='mean' is not allowed; allowed: 'code', 'paper'"):
        sdmerge.apply(model, "evit", evit_fusion="mean")
    with pytest.raises(ValueError, match="evit_fusion='paper' applies to method 'evit' only, not 'topk'"):
        sdmerge.apply(model, "topk", evit_fusion="paper")



@pytest.mark.parametrize("name", ["hf ViT", "timm DeiT distilled"])
def test_evit_fusion_rules_and_proportional_attention(name):
    options = SCHEDULES["constant"]  # a fused token in every block
    model, x, paper, _, _ = reference_run(name, "evit", options, evit_fusion="paper")
    torch.testing.assert_close(patched_logits(model, x, "evit", evit_fusion="paper", **options), paper, rtol=1e-5, atol=1e-5)
    code = patched_logits(model, x, "evit", **options)
    assert (code - paper).abs().max() > 1e-4  # the rules differ: the checks can fail
    # every token of EViT has size 1 (the fused token too): proportional attention has nothing to act on
    assert torch.equal(patched_logits(model, x, "evit", prop_attn=False, **options), code)


def test_evit_fuses_a_single_pruned_token_where_the_stage_count_stays():
    """r=0.99 on 64 patches: K_s = 63, 62, 62. EViT prunes 1, then 2 (the first fused token is one of
    the 64 candidates), then 1 token: the first and last stages keep the token count, and the one
    pruned token becomes a_i x_i, as in EViT's code. Merging methods do nothing at the last stage."""
    options = dict(r=0.99, stages=(2, 5, 8))
    model, x, expected, _, members = reference_run("hf ViT", "evit", options)
    unreduced = patched_logits(model, x, "evit", r=1.0)
    logits = patched_logits(model, x, "evit", **options)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert (logits - unreduced).abs().max() > 1e-4
    state = reduction_state(model)
    assert state.removals == (0, 0, 1, 0, 0, 2, 0, 0, 1, 0, 0, 0)
    assert state.sizes.shape[1] == 1 + 62 + 1  # class token, K_3 kept tokens, the fused token
    patched_logits(model, x, "tome", **options)
    assert reduction_state(model).removals == (0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0)
