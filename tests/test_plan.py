"""Merge plans: sizes, merge/unmerge, weighted averages, composition, dropped tokens, keep rates."""

import math

import pytest
import torch

from sdmerge.core import MergePlan, check_keep_rate, plan_from_representatives, tokens_to_remove


def random_plan(batch, tokens, groups, seed, sizes=None):
    """A plan where every sample uses every one of ``groups`` labels, in random positions."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack(
        [torch.cat([torch.arange(groups), torch.randint(groups, (tokens - groups,), generator=g)])[
            torch.randperm(tokens, generator=g)] for _ in range(batch)]
    )
    return MergePlan(labels, groups, sizes)


def direct_weighted_mean(x, labels, weights, groups):
    out = torch.zeros(x.shape[0], groups, x.shape[2], dtype=torch.float64)
    for b in range(x.shape[0]):
        for group in range(groups):
            members = labels[b] == group
            w = weights[b, members].double()
            out[b, group] = (w[:, None] * x[b, members].double()).sum(0) / w.sum()
    return out


def test_sizes_sum_to_the_original_token_count():
    plan = random_plan(3, 50, 17, seed=0)
    assert torch.equal(plan.merged_sizes.sum(-1), torch.full((3,), 50.0))
    sizes = torch.rand(3, 50) * 4 + 1
    sized = MergePlan(plan.labels, 17, sizes)
    torch.testing.assert_close(sized.merged_sizes.sum(-1), sizes.sum(-1))


def test_unmerge_of_merge_returns_x_when_x_is_constant_in_each_group():
    plan = random_plan(2, 40, 9, seed=1)
    rows = torch.randn(2, 9, 6)
    x = plan.unmerge(rows)
    assert torch.equal(x, rows.gather(1, plan.labels[..., None].expand(-1, -1, 6)))
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x)
    torch.testing.assert_close(plan.merge(x, weights=torch.rand(2, 40)), rows)


def test_weighted_averages_match_a_direct_computation():
    plan = random_plan(2, 30, 8, seed=2, sizes=torch.randint(1, 5, (2, 30)).float())
    x = torch.randn(2, 30, 5)
    weights = torch.rand(2, 30) + 0.1
    torch.testing.assert_close(plan.merge(x, weights).double(), direct_weighted_mean(x, plan.labels, weights, 8))
    # default weights are the sizes; without sizes, a plain mean
    torch.testing.assert_close(plan.merge(x).double(), direct_weighted_mean(x, plan.labels, plan.sizes, 8))
    plain = MergePlan(plan.labels, 8)
    torch.testing.assert_close(plain.merge(x).double(), direct_weighted_mean(x, plan.labels, torch.ones(2, 30), 8))
    # normalise=False: the weighted sum of each group, sum_i w_i x_i (dropped tokens left out)
    summed = torch.stack([torch.stack([(weights[b, plan.labels[b] == g, None] * x[b, plan.labels[b] == g]).sum(0)
                                       for g in range(8)]) for b in range(2)])
    torch.testing.assert_close(plan.merge(x, weights, normalise=False), summed)
    dropping = MergePlan(torch.tensor([[0, 2, 1, 0]]), 2, drops=True)
    sums = dropping.merge(torch.tensor([[[1.0], [5.0], [3.0], [4.0]]]), torch.tensor([[0.5, 9.0, 0.25, 2.0]]), normalise=False)
    assert sums.tolist() == [[[0.5 * 1 + 2.0 * 4], [0.25 * 3]]]
    with pytest.raises(ValueError, match="normalise=False sums the tokens with their weights; pass weights"):
        plan.merge(x, normalise=False)


def test_zero_and_underflowing_weights_fall_back_safely():
    labels = torch.tensor([[0, 0, 1, 1, 2]])
    plan = MergePlan(labels, 3)
    x = torch.tensor([[[1.0], [3.0], [5.0], [7.0], [9.0]]])
    zero = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0]])
    # group 0 has only zero weights: its plain mean; group 1 all weight on token 2; group 2 alone
    assert torch.equal(plan.merge(x, zero), torch.tensor([[[2.0], [5.0], [9.0]]]))
    tiny = torch.tensor([[1e-8, 3e-8, 1e-8, 1e-8, 0.0]]).half()  # underflows in float16
    out = plan.merge(x.half(), tiny)
    assert torch.isfinite(out).all()


def test_composition_equals_one_plan_of_the_composed_groups():
    sizes = torch.ones(2, 60)
    first = random_plan(2, 60, 25, seed=3, sizes=sizes)
    second = random_plan(2, 25, 10, seed=4, sizes=first.merged_sizes)
    composed = first.then(second)
    x = torch.randn(2, 60, 7, dtype=torch.float64)
    torch.testing.assert_close(composed.merge(x), second.merge(first.merge(x)))
    torch.testing.assert_close(composed.merged_sizes, second.merged_sizes)
    # provenance: original token i ends in the group its first-plan group was merged into
    for b in range(2):
        for i in range(60):
            assert composed.labels[b, i] == second.labels[b, first.labels[b, i]]
    torch.testing.assert_close(composed.unmerge(composed.merge(x)), first.unmerge(second.unmerge(second.merge(first.merge(x)))))


def test_representatives_number_groups_by_first_token_and_drop():
    representative = torch.tensor([[0, 1, 1, 3, 1, 3], [0, 0, 2, 2, 4, 4]])
    plan = plan_from_representatives(representative, 3)
    assert torch.equal(plan.labels, torch.tensor([[0, 1, 1, 2, 1, 2], [0, 0, 1, 1, 2, 2]]))
    dropping = plan_from_representatives(torch.tensor([[0, -1, 2, -1]]), 2, drops=True)
    assert torch.equal(dropping.labels, torch.tensor([[0, 2, 1, 2]]))
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0]]])
    assert torch.equal(dropping.merge(x), torch.tensor([[[1.0], [3.0]]]))
    assert torch.equal(dropping.unmerge(dropping.merge(x)), torch.tensor([[[1.0], [0.0], [3.0], [0.0]]]))
    assert torch.equal(dropping.merged_sizes, torch.tensor([[1.0, 1.0]]))
    # a token dropped by the first plan stays dropped after composition
    then = dropping.then(MergePlan(torch.tensor([[0, 0]]), 1))
    assert torch.equal(then.labels, torch.tensor([[0, 1, 0, 1]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge_move_whole_rows(dtype):
    """Merging adds every token's row to its group's row (``index_add_`` on ``[B*N, C]``) and
    unmerging copies rows back (``index_select``): no element-wise scatter or gather through an
    index expanded to ``[B, N, C]`` (2-4x the time on the CPU for wide tokens). A batch of 3 with
    dropped tokens and a non-contiguous input gives the direct per-sample means."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # ops on rows of C = 5 channels
            if any(isinstance(a, torch.Tensor) and a.dim() and a.shape[-1] == 5 for a in args):
                self.names.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.tensor([0, 3, 1, 2, 3, 0, 1, 2]), torch.tensor([2, 1, 0, 3, 3, 2, 1, 0]),
                          torch.tensor([3, 3, 0, 1, 2, 2, 1, 0])])  # 3 = dropped
    plan = MergePlan(labels, 3, drops=True)
    x = torch.randn(3, 8, 10, generator=g).to(dtype)[:, :, ::2]  # [3, 8, 5], not contiguous
    with Ops() as ops:
        merged = plan.merge(x)
        back = plan.unmerge(merged)
    assert {"index_add_", "index_select"} <= ops.names and not ops.names & {"scatter_add", "scatter_add_", "gather"}, ops.names
    expected = direct_weighted_mean(x, torch.where(labels == 3, -1, labels), torch.ones(3, 8), 3)
    assert torch.allclose(merged.double(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(back, torch.where((labels == 3)[..., None], 0, merged.gather(1, labels.clamp(max=2)[..., None].expand(3, 8, 5))))


def test_keep_rates_and_removal_counts():
    assert tokens_to_remove(4096, 1.0) == 0
    assert tokens_to_remove(4096, 0.4) == 2457  # int(4096 * 0.6)
    assert tokens_to_remove(1000, 0.9) == 100  # not 99 from float round-off
    assert tokens_to_remove(197, 0.7) == 59
    assert check_keep_rate(1) == 1.0
    for bad in (0, -0.1, 1.01, math.nan, "0.5x", None):
        with pytest.raises(ValueError, match=r"keep rate r=.* (outside|not a number).*0 < r <= 1"):
            tokens_to_remove(100, bad)


def test_bad_shapes_raise():
    plan = random_plan(2, 10, 4, seed=5)
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        plan.merge(torch.randn(2, 11, 3))
    with pytest.raises(ValueError, match=r"weights must be \[B, N\]"):
        plan.merge(torch.randn(2, 10, 3), torch.rand(2, 9))
    with pytest.raises(ValueError, match=r"y must be \[B, M, C\]"):
        plan.unmerge(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="int64"):
        MergePlan(torch.zeros(2, 10, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match="cannot compose"):
        plan.then(random_plan(2, 5, 2, seed=6))
