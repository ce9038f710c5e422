"""Crucial-token merging (MSTM eq. 4), Top-K / EViT pruning, class importance score (ToMeCIS eq. 7-8),
proportional attention, and the method registry."""

import math

import pytest
import torch

import sdmerge
from sdmerge.core import (
    crucial_token_merging,
    evit_fusion,
    evit_merge,
    head_mean_importance_score,
    importance_score,
    proportional_attention_bias,
    top_k_pruning,
)
from sdmerge.methods import METHODS, get_method


def test_crucial_tokens_stay_and_the_rest_join_their_most_similar_crucial_token():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(2, 20, 6, generator=g)
    importance = torch.rand(2, 20, generator=g)
    plan = crucial_token_merging(metric, importance, remove=12, protected=1)
    assert plan.num_groups == 8
    unit = torch.nn.functional.normalize(metric, dim=-1)
    for b in range(2):
        crucial = (importance[b, 1:].argsort(descending=True)[:7] + 1).sort().values
        rest = [i for i in range(1, 20) if i not in crucial.tolist()]
        assert plan.labels[b, 0] == 0  # the protected token is alone
        for group, token in enumerate(crucial.tolist(), start=1):
            assert plan.labels[b, token] == group
        for token in rest:
            best = crucial[(unit[b, token] @ unit[b, crucial].T).argmax()]
            assert plan.labels[b, token] == plan.labels[b, best]
        # eq. 4: m_j = (w_j i_j + sum_k w_k u_k) / (w_j + sum_k w_k)
        x = torch.randn(20, 3, generator=g)
        merged = plan.merge(x[None].expand(2, -1, -1).contiguous(), importance)[b]
        for group in range(8):
            members = plan.labels[b] == group
            w = importance[b, members]
            torch.testing.assert_close(merged[group], (w[:, None] * x[members]).sum(0) / w.sum())


def test_top_k_keeps_the_most_important_and_drops_the_rest():
    importance = torch.tensor([[9.0, 0.1, 0.5, 0.3, 0.9, 0.2]])
    plan = top_k_pruning(importance, remove=3, protected=1)
    assert plan.num_groups == 3 and plan.drops
    x = torch.arange(6.0).view(1, 6, 1)
    assert plan.merge(x).flatten().tolist() == [0.0, 2.0, 4.0]  # class token, then kept by position
    assert plan.merged_sizes.tolist() == [[1.0, 1.0, 1.0]]


def test_evit_keeps_the_top_tokens_and_appends_their_attention_weighted_sum():
    # a class-token attention row (softmax over all 6 tokens, the class token's own share included)
    attention = torch.tensor([[0.40, 0.05, 0.20, 0.10, 0.15, 0.10]])
    x = torch.tensor([[float(i), float(i * i)] for i in range(6)])[None]  # [1, 6, 2], token i = (i, i^2)
    plan = evit_fusion(attention, prune=3, protected=1)
    # kept: the class token, then tokens 2 (0.20) and 4 (0.15) in their order; 1, 3, 5 fused into the last token
    assert plan.num_groups == 4 and plan.labels.tolist() == [[0, 3, 1, 3, 2, 3]]
    assert plan.merged_sizes.tolist() == [[1.0, 1.0, 1.0, 3.0]]  # the patches each token holds (provenance)
    fused = 0.05 * x[0, 1] + 0.10 * x[0, 3] + 0.10 * x[0, 5]  # the weights sum to 0.25, not 1: EViT's code
    torch.testing.assert_close(evit_merge(plan, x, attention), torch.stack([x[0, 0], x[0, 2], x[0, 4], fused])[None])
    paper = evit_merge(plan, x, attention, average=True)  # the paper's weighted average
    torch.testing.assert_close(paper, torch.stack([x[0, 0], x[0, 2], x[0, 4], fused / 0.25])[None])
    with pytest.raises(ValueError, match="EViT fuses at least 1 token, asked to prune 0"):
        evit_fusion(attention, prune=0, protected=1)
    with pytest.raises(ValueError, match="EViT can remove at most 4 of 6 tokens"):  # one token is kept besides the fused one
        evit_fusion(attention, prune=5, protected=1)


def test_removal_limits_raise():
    with pytest.raises(ValueError, match="top-k pruning can remove at most 4 of 6 tokens"):
        top_k_pruning(torch.rand(1, 6), remove=5, protected=1)
    with pytest.raises(ValueError, match="crucial-token merging can remove at most 3 of 6 tokens"):
        crucial_token_merging(torch.rand(1, 6, 2), torch.rand(1, 6), remove=4, protected=2)


def test_class_importance_score_is_the_head_mean_of_attention_times_value_norm():
    g = torch.Generator().manual_seed(1)
    attention = torch.rand(2, 3, 5, generator=g)
    values = torch.randn(2, 3, 5, 4, generator=g)
    expected = torch.zeros(2, 5)
    for h in range(3):
        expected += attention[:, h] * values[:, h].pow(2).sum(-1).sqrt() / 3
    torch.testing.assert_close(importance_score(attention, values), expected)
    # float16 inputs whose product underflows in float16 keep non-zero float32 scores
    tiny = importance_score(torch.full((1, 1, 2), 1e-4).half(), torch.full((1, 1, 2, 4), 1e-4).half())
    assert tiny.dtype == torch.float32 and (tiny > 0).all()
    with pytest.raises(ValueError, match="does not match"):
        importance_score(attention, values[:, :2])


def test_code_class_importance_score_multiplies_the_head_means():
    """ToMeCIS's code: mean over heads of A times the norm of the mean over heads of V."""
    g = torch.Generator().manual_seed(1)
    attention = torch.rand(2, 3, 5, generator=g)
    values = torch.randn(2, 3, 5, 4, generator=g)
    mean_attention = sum(attention[:, h] for h in range(3)) / 3
    mean_values = sum(values[:, h] for h in range(3)) / 3
    expected = mean_attention * mean_values.pow(2).sum(-1).sqrt()
    torch.testing.assert_close(head_mean_importance_score(attention, values), expected)
    assert (head_mean_importance_score(attention, values) - importance_score(attention, values)).abs().max() > 1e-2
    one_head = (attention[:, :1], values[:, :1])  # with one head (the SD path) both readings agree
    torch.testing.assert_close(head_mean_importance_score(*one_head), importance_score(*one_head))
    with pytest.raises(ValueError, match="does not match"):
        head_mean_importance_score(attention, values[:, :2])


def test_proportional_attention_counts_a_token_as_many_times_as_its_size():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    sizes = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    biased = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=proportional_attention_bias(sizes))
    repeat = torch.tensor([0, 1, 1, 1, 2, 3, 3])  # every key repeated `size` times
    repeated = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, repeat], v[:, :, repeat])
    torch.testing.assert_close(biased, repeated)
    assert proportional_attention_bias(sizes).shape == (1, 1, 1, 4)
    assert proportional_attention_bias(sizes)[0, 0, 0, 1].item() == pytest.approx(math.log(3))


def test_method_registry():
    assert sdmerge.METHODS == tuple(METHODS)
    assert {m for m in METHODS if "sd" in METHODS[m].models} == {
        "tome", "atc_single", "atc_complete", "atc_average", "cis", "crucial", "grid"}
    with pytest.raises(ValueError, match="unknown method 'grid' for vit models"):
        get_method("grid", "vit")
    with pytest.raises(ValueError, match="needs the token grid and the window"):
        get_method("grid", "sd").plan(torch.randn(2, 16, 4), 12)
    with pytest.raises(ValueError, match="unknown method 'tomee'; valid methods: tome, atc_single"):
        get_method("tomee", "sd")
    with pytest.raises(ValueError, match="unknown method 'topk' for sd models"):
        get_method("topk", "sd")
    assert get_method("atc_complete", "vit").linkage == "complete"
    assert get_method("cis", "vit").weights(torch.ones(1, 3), torch.rand(1, 3)) is not None
    metric = torch.randn(2, 9, 4)
    plan = get_method("crucial", "vit").plan(metric, 4, protected=1, importance=torch.rand(2, 9))
    assert plan.num_groups == 5
    with pytest.raises(ValueError, match="needs an importance score"):
        get_method("topk", "vit").plan(metric, 4, protected=1)
    with pytest.raises(ValueError, match="needs a source/destination split"):
        get_method("tome", "vit").plan(metric, 4)
