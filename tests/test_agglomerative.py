"""ATC: identical partitions to scipy's linkage + fcluster on the same float64 distances."""

import numpy as np
import pytest
import torch

from sdmerge import cluster
from sdmerge.core import LINKAGES, agglomerative_clustering, cosine_distances
from tests.helpers import canonical, clustered_metric, scipy_partition


def assert_matches_scipy(metric, k, method):
    labels = cluster(metric, k, method)
    assert labels.dtype == torch.int64 and labels.shape == metric.shape[:2]
    for got, want in zip(labels, scipy_partition(metric, k, method)):
        assert sorted(set(got.tolist())) == list(range(k)), "labels must be 0..k-1, every one used"
        np.testing.assert_array_equal(canonical(got), want)


@pytest.mark.parametrize("method", LINKAGES)
@pytest.mark.parametrize("tokens, batch", [(7, 3), (64, 2), (197, 3)])
def test_random_inputs_match_scipy_for_every_k(method, tokens, batch):
    metric = torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(tokens))
    for k in sorted({1, 2, tokens // 4, tokens // 2, (7 * tokens) // 10, tokens - 1, tokens}):
        assert_matches_scipy(metric, max(k, 1), method)


@pytest.mark.parametrize("method", LINKAGES)
def test_clustered_inputs_match_scipy(method):
    metric = clustered_metric(batch=2, tokens=300, dim=24, centers=12, seed=1)
    for k in (5, 12, 40, 150):
        assert_matches_scipy(metric, k, method)


@pytest.mark.parametrize("method", LINKAGES)
def test_1024_tokens_match_scipy(method):
    metric = torch.randn(2, 1024, 64, generator=torch.Generator().manual_seed(3))
    for keep in (0.7, 0.4):
        assert_matches_scipy(metric, int(1024 * keep), method)


@pytest.mark.parametrize("method", LINKAGES)
def test_4096_tokens_match_scipy(method):
    """Stable Diffusion's token count at 512x512 (SD-1.5 top level), batch 2."""
    metric = clustered_metric(batch=2, tokens=4096, dim=32, centers=64, seed=4)
    assert_matches_scipy(metric, int(4096 * 0.4), method)


def test_float16_metric_clusters_like_its_float32_copy():
    metric = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(5)).half()
    for method in LINKAGES:
        assert_matches_scipy(metric, 50, method)
        assert torch.equal(cluster(metric, 50, method), cluster(metric.float(), 50, method))


@pytest.mark.parametrize("method", LINKAGES)
def test_exact_ties_still_give_exactly_k_clusters(method):
    """One-hot tokens repeated: distances are exactly 0 or 1, so merges tie massively; the only
    valid partition into as many clusters as distinct tokens groups the repeats."""
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 9, (4, 80), generator=g)
    metric = torch.eye(9)[ids]
    for b in range(4):
        distinct = len(set(ids[b].tolist()))
        labels = cluster(metric[b : b + 1], distinct, method)[0]
        np.testing.assert_array_equal(canonical(labels), canonical(ids[b]))
    labels = cluster(metric, 3, method)  # fewer clusters than distinct tokens: ties at height 1
    assert all(sorted(set(row.tolist())) == [0, 1, 2] for row in labels)


def test_cosine_distances_are_symmetric_with_zero_diagonal():
    metric = torch.randn(2, 700, 20, generator=torch.Generator().manual_seed(7))
    d = cosine_distances(metric)
    assert d.dtype == torch.float64
    assert torch.equal(d, d.transpose(1, 2))
    assert torch.all(d.diagonal(dim1=1, dim2=2) == 0)
    unit = torch.nn.functional.normalize(metric, dim=-1)
    direct = (1 - unit @ unit.transpose(1, 2)).double()
    off_diagonal = ~torch.eye(700, dtype=torch.bool)
    torch.testing.assert_close(d[:, off_diagonal], direct[:, off_diagonal], atol=1e-6, rtol=0)


def test_a_metric_that_requires_grad_is_accepted():
    metric = torch.randn(2, 40, 8, requires_grad=True)
    assert cosine_distances(metric).requires_grad is False
    assert torch.equal(cluster(metric, 10), cluster(metric.detach(), 10))


@pytest.mark.parametrize("method", LINKAGES)
def test_protected_tokens_are_excluded(method):
    metric = clustered_metric(batch=3, tokens=66, dim=12, centers=5, seed=8)
    plan = agglomerative_clustering(metric, remove=40, linkage=method, protected=2)
    assert plan.num_groups == 26
    assert torch.equal(plan.labels[:, :2], torch.tensor([[0, 1]] * 3))
    assert (plan.labels[:, 2:] >= 2).all()
    for got, want in zip(plan.labels[:, 2:], scipy_partition(metric[:, 2:], 24, method)):
        np.testing.assert_array_equal(canonical(got), want)


def test_bad_requests_raise_clear_errors():
    metric = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="unknown linkage 'ward'; allowed: single, complete, average"):
        cluster(metric, 3, "ward")
    with pytest.raises(ValueError, match=r"k=0 clusters requested for 10 tokens; allowed: 1 <= k <= 10"):
        cluster(metric, 0)
    with pytest.raises(ValueError, match=r"k=11"):
        cluster(metric, 11)
    with pytest.raises(ValueError, match=r"metric must be \[B, N, D\]"):
        cluster(metric[0], 3)
    with pytest.raises(ValueError, match="can remove at most 7 of 10 tokens"):
        agglomerative_clustering(metric, remove=8, protected=2)
