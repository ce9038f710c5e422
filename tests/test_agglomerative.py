"""ATC: identical partitions to scipy's linkage + fcluster on the same float64 distances, on both
clustering paths; the accelerator path's operation and synchronisation counts per round; the
memory check and the CPU path's measured peak memory; bad arguments."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.distance import squareform

import sdmerge.core.agglomerative as agglomerative
from eval.dispatch_counts import count_dispatches
from sdmerge import cluster
from sdmerge.core import LINKAGES, agglomerative_clustering, cosine_distances
from sdmerge.core.agglomerative import ClusteringMemoryError, agglomerative_labels, cluster_with_rounds
from sdmerge.core.device_memory import HOST_MARGIN
from sdmerge.core.rnn_rounds import ROUND_RANGE
from tests.helpers import canonical, clustered_metric, scipy_partition

PATHS = ("cpu", "accelerator")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test on each path: ``cluster``'s default (``"auto"``) is replaced by the path."""
    original = agglomerative.cluster_with_rounds

    def forced(metric, k, linkage="average", *, path="auto"):
        return original(metric, k, linkage, path=request.param if path == "auto" else path)

    monkeypatch.setattr(agglomerative, "cluster_with_rounds", forced)
    return request.param


def assert_matches_scipy(metric, k, method):
    labels = cluster(metric, k, method)
    assert labels.dtype == torch.int64 and labels.shape == metric.shape[:2]
    for got, want in zip(labels, scipy_partition(metric, k, method)):
        assert sorted(set(got.tolist())) == list(range(k)), "labels must be 0..k-1, every one used"
        np.testing.assert_array_equal(canonical(got), want)


@pytest.mark.parametrize("method", LINKAGES)
@pytest.mark.parametrize("tokens, batch", [(7, 3), (64, 2), (197, 3)])
def test_random_inputs_match_scipy_for_every_k(method, tokens, batch, path):
    metric = torch.randn(batch, tokens, 16, generator=torch.Generator().manual_seed(tokens))
    for k in sorted({1, 2, tokens // 4, tokens // 2, (7 * tokens) // 10, tokens - 1, tokens}):
        assert_matches_scipy(metric, max(k, 1), method)


@pytest.mark.parametrize("method", LINKAGES)
def test_clustered_inputs_match_scipy(method, path):
    metric = clustered_metric(batch=2, tokens=300, dim=24, centers=12, seed=1)
    for k in (5, 12, 40, 150):
        assert_matches_scipy(metric, k, method)


@pytest.mark.parametrize("method", LINKAGES)
def test_1024_tokens_match_scipy(method, path):
    metric = torch.randn(2, 1024, 64, generator=torch.Generator().manual_seed(3))
    for keep in (0.7, 0.4):
        assert_matches_scipy(metric, int(1024 * keep), method)


@pytest.mark.parametrize("method", LINKAGES)
def test_4096_tokens_match_scipy(method, path):
    """Stable Diffusion's token count at 512x512 (SD-1.5 top level), batch 2."""
    metric = clustered_metric(batch=2, tokens=4096, dim=32, centers=64, seed=4)
    k = int(4096 * 0.4)
    if method not in _REFERENCE_4096:  # scipy's partition, computed once for both paths
        _REFERENCE_4096[method] = scipy_partition(metric, k, method)
    labels = cluster(metric, k, method)
    for got, want in zip(labels, _REFERENCE_4096[method]):
        np.testing.assert_array_equal(canonical(got), want)


_REFERENCE_4096: dict = {}


def test_float16_metric_clusters_like_its_float32_copy(path):
    metric = torch.randn(2, 128, 32, generator=torch.Generator().manual_seed(5)).half()
    for method in LINKAGES:
        assert_matches_scipy(metric, 50, method)
        assert torch.equal(cluster(metric, 50, method), cluster(metric.float(), 50, method))


@pytest.mark.parametrize("method", LINKAGES)
def test_exact_ties_still_give_exactly_k_clusters(method, path):
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_condensed_distances_are_the_square_matrix_upper_triangle_bit_for_bit(dtype, monkeypatch):
    """The CPU path's condensed distances are scipy's ``squareform`` of the accelerator path's
    matrix, exactly, across several row blocks (one of them partial)."""
    import sdmerge.core.distances as distances

    monkeypatch.setattr(distances, "DISTANCE_BLOCK", 96)
    metric = torch.randn(2, 250, 12, generator=torch.Generator().manual_seed(14), dtype=dtype)
    condensed = distances.condensed_cosine_distances(metric)
    assert condensed.dtype == torch.float64 and condensed.shape == (2, 250 * 249 // 2)
    for got, square in zip(condensed, cosine_distances(metric)):
        np.testing.assert_array_equal(got.numpy(), squareform(square.numpy(), checks=False))


def test_cpu_path_threads_give_the_serial_labels(monkeypatch):
    """The CPU path clusters the samples of a batch in parallel threads (one per torch thread, at
    most one per sample); the labels are those of one sample at a time."""
    import sdmerge.core.host_linkage as host_linkage

    pools = []

    class CountedPool(host_linkage.ThreadPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(host_linkage, "ThreadPoolExecutor", CountedPool)
    metric = clustered_metric(batch=3, tokens=120, dim=8, centers=7, seed=15)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = [cluster(metric[b : b + 1], 30, "average", path="cpu") for b in range(3)]
        serial_batch = cluster(metric, 30, "average", path="cpu")
        assert pools == []
        torch.set_num_threads(4)
        parallel = cluster(metric, 30, "average", path="cpu")
    finally:
        torch.set_num_threads(threads)
    assert pools == [3]
    assert torch.equal(parallel, torch.cat(serial)) and torch.equal(serial_batch, parallel)


def test_a_metric_that_requires_grad_is_accepted(path):
    metric = torch.randn(2, 40, 8, requires_grad=True)
    assert cosine_distances(metric).requires_grad is False
    assert torch.equal(cluster(metric, 10), cluster(metric.detach(), 10))


@pytest.mark.parametrize("method", LINKAGES)
def test_protected_tokens_are_excluded(method, path):
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


def test_both_paths_give_the_same_labels_and_rounds_on_any_device():
    metric = clustered_metric(batch=2, tokens=130, dim=16, centers=9, seed=9)
    for method in LINKAGES:
        (cpu, cpu_rounds), (accelerator, accelerator_rounds) = (
            cluster_with_rounds(metric, 45, method, path=path) for path in PATHS
        )
        assert torch.equal(cpu, accelerator)
        assert cpu_rounds == 0 and accelerator_rounds > 0  # the CPU path is fastcluster's: no rounds
        assert torch.equal(cluster(metric, 45, method, path="auto"), cpu)  # CPU tensors: "cpu"
        for path in PATHS:  # from a distance matrix
            labels = agglomerative_labels(cosine_distances(metric), 45, method, path=path)
            assert torch.equal(labels, cpu)


@pytest.mark.parametrize("method", LINKAGES)
def test_accelerator_path_dispatch_bounds_per_round(method):
    """At most 100 aten operations and 2 host synchronisations per merge round on the
    accelerator path (counted on the CPU: the counts are the same on any device)."""
    metric = clustered_metric(batch=2, tokens=1024, dim=32, centers=40, seed=10)
    counts = count_dispatches(lambda: cluster_with_rounds(metric, 410, method, path="accelerator"), ROUND_RANGE)
    labels, rounds = counts.result
    assert counts.ranges == rounds + 1  # the last range finds no pair
    assert rounds >= 3
    operations, synchronisations = counts.per_range()
    assert operations <= 100, (method, operations)
    assert synchronisations <= 2, (method, synchronisations)
    for got, want in zip(labels, scipy_partition(metric, 410, method)):
        np.testing.assert_array_equal(canonical(got), want)
    # Outside the rounds (distances, set-up, the cut): no synchronisation at all.
    assert counts.host_syncs == counts.host_syncs_within


def test_bad_path_is_rejected():
    metric = torch.randn(1, 10, 4)
    with pytest.raises(ValueError, match="unknown clustering path 'gpu'; allowed: auto, cpu, accelerator"):
        cluster(metric, 3, path="gpu")
    with pytest.raises(ValueError, match="unknown clustering path 'gpu'"):
        agglomerative_clustering(metric, remove=3, path="gpu")


@pytest.mark.parametrize("k", [1.5, 3.0, True, "3", None])
def test_k_must_be_an_int(k):
    with pytest.raises(TypeError, match=f"k={k!r} must be an int"):
        cluster(torch.randn(1, 10, 4), k)


def test_numpy_and_python_ints_are_accepted_for_k():
    metric = torch.randn(2, 30, 4, generator=torch.Generator().manual_seed(11))
    assert torch.equal(cluster(metric, np.int64(7)), cluster(metric, 7))


def test_memory_check_raises_before_allocating(monkeypatch):
    """A matrix that does not fit: a clear error, raised before the distance matrix exists."""
    monkeypatch.setattr(agglomerative, "available_bytes", lambda device: 10**9)
    allocated = []
    for builder in ("cosine_distances", "condensed_cosine_distances"):
        monkeypatch.setattr(agglomerative, builder, lambda *args: allocated.append(args))
    metric = torch.randn(2, 16384, 8)
    for path in PATHS:
        with pytest.raises(ClusteringMemoryError) as error:
            cluster(metric, 100, path=path)
        message = str(error.value)
        needed = agglomerative.clustering_bytes(2, 16384, 8, torch.float32, torch.float64, path)
        for part in ("16384 tokens", "batch 2", f"{needed / 2**30:.2f} GiB on cpu", "only 0.93 GiB is available",
                     "0.09 GiB of which is kept free", "16384x16384 torch.float64", "smaller batch", "'tome'",
                     "max_downsample"):
            assert part in message, (part, message)
        assert isinstance(error.value, MemoryError) and not allocated
    assert ("upper triangle of" in message) == (path == "cpu")
    # Accelerator: at least the float64 matrix and one more of its size; single and complete
    # linkage store float32. CPU: the condensed float64 upper triangle, about half a matrix.
    needed, float32, cpu = (
        agglomerative.clustering_bytes(2, 16384, 8, torch.float32, dtype, path) - agglomerative.SMALL_ALLOCATIONS_BYTES
        for dtype, path in [(torch.float64, "accelerator"), (torch.float32, "accelerator"), (torch.float64, "cpu")]
    )
    assert needed >= 2 * 2 * 16384 * 16384 * 8 and float32 * 2 == needed
    assert 2 * 16384 * 16383 * 4 <= cpu < needed / 3


def test_memory_check_keeps_a_margin_of_host_memory_free(monkeypatch):
    """On the host the check lets through what fits in the available memory less
    ``HOST_MARGIN`` of it, and refuses what fits only in all of it."""
    metric = torch.randn(1, 50, 4, generator=torch.Generator().manual_seed(12))
    expected = cluster(metric, 20)
    needed = agglomerative.clustering_bytes(1, 50, 4, torch.float32, torch.float64, "cpu")  # CPU tensors: "cpu"
    enough = math.ceil(needed / (1 - HOST_MARGIN)) + 1
    for available in (None, enough):
        monkeypatch.setattr(agglomerative, "available_bytes", lambda device, value=available: value)
        assert torch.equal(cluster(metric, 20), expected)
    monkeypatch.setattr(agglomerative, "available_bytes", lambda device: needed)
    with pytest.raises(ClusteringMemoryError, match="of which is kept free"):
        cluster(metric, 20)


def test_cpu_path_from_a_device_checks_the_device_and_the_host(monkeypatch):
    """The ``"cpu"`` path from another device builds the distances there and clusters their host
    copy: each memory is checked for its share, the margin kept on the host only."""
    from sdmerge.core.distances import condensed_bytes, working_bytes
    from sdmerge.core.host_linkage import linkage_working_bytes

    metric = torch.empty(2, 3000, 16, dtype=torch.float16, device="meta")  # any device but the host
    each = condensed_bytes(2, 3000) + agglomerative.SMALL_ALLOCATIONS_BYTES
    on_device = each + working_bytes(2, 3000, 16, torch.float16)
    on_host = each + linkage_working_bytes(2, 3000)
    host_enough = math.ceil(on_host / (1 - HOST_MARGIN)) + 1
    for device_free, host_free, refused in [(on_device, host_enough, None), (on_device - 1, 10**12, "meta"),
                                            (10**12, on_host, "cpu")]:
        free = {"meta": device_free, "cpu": host_free}
        monkeypatch.setattr(agglomerative, "available_bytes", lambda device, free=free: free[device.type])
        if refused is None:
            agglomerative.check_memory(metric, torch.float64, "cpu")
            continue
        with pytest.raises(ClusteringMemoryError) as error:
            agglomerative.check_memory(metric, torch.float64, "cpu")
        message = str(error.value)
        assert f"on {refused} " in message and ("kept free" in message) == (refused == "cpu"), message


def test_cpu_path_peak_memory_is_within_the_check():
    """The CPU path's measured peak resident memory (a fresh process, 6000 tokens: 137 MiB of
    distances per sample, the samples of batch 2 clustered at once) is at most
    ``clustering_bytes``, which is not far above it: fastcluster works in the distances (a copy
    of them would double the peak)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc to reset and read a process's peak resident memory")
    run = subprocess.run(
        [sys.executable, "-m", "tests.peak_memory", "6000", "64", "single", "1", "2"],
        cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True, text=True, check=True,
    )
    results = [json.loads(line) for line in run.stdout.splitlines()]
    assert [result["batch"] for result in results] == [1, 2]
    for result in results:
        increase, predicted = result["increase"], result["predicted"]
        distances = 8 * result["batch"] * 6000 * 5999 // 2
        assert distances <= increase <= predicted, result
        assert predicted <= 1.25 * increase, result


def test_in_place_linkage_is_fastclusters_linkage():
    """Calling fastcluster's C++ entry point on the distances themselves gives its public
    ``linkage``'s merges exactly (random and massively tied distances, every linkage), works in
    the given array (no copy: average and complete linkage overwrite it) and refuses arrays it
    would misread."""
    import fastcluster

    from sdmerge.core.host_linkage import linkage_in_place

    g = torch.Generator().manual_seed(16)
    tied = torch.eye(5)[torch.randint(0, 5, (1, 60), generator=g)]
    for metric in (torch.randn(1, 90, 6, generator=g), tied):
        tokens = metric.shape[1]
        for method in LINKAGES:
            condensed = squareform(cosine_distances(metric)[0].numpy(), checks=False)
            expected = fastcluster.linkage(condensed, method)
            work = condensed.copy()
            np.testing.assert_array_equal(linkage_in_place(work, tokens, method), expected)
            if metric is not tied:  # merging tied clusters rewrites the same distances
                assert np.array_equal(work, condensed) == (method == "single"), method
    good = np.zeros(45)
    for bad in (good.astype(np.float32), np.zeros(90)[::2], np.zeros(44), np.frombuffer(good.tobytes())):
        with pytest.raises(ValueError, match="writable C-contiguous float64 vector of 10 \\* 9 / 2 = 45"):
            linkage_in_place(bad, 10, "average")


def test_host_memory_is_reported():
    from sdmerge.core.device_memory import available_bytes

    free = available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert available_bytes(torch.device("meta")) is None


@pytest.mark.parametrize("method", LINKAGES)
def test_large_batches_in_groups_match_scipy(method, monkeypatch):
    """Large batches: the accelerator path clusters groups of samples, the CPU path samples in
    parallel threads; both stay exact."""
    import sdmerge.core.rnn_rounds as rounds

    monkeypatch.setattr(rounds, "GROUP_TOKENS", 100)  # 2 samples of 45 tokens per group
    metric = clustered_metric(batch=5, tokens=45, dim=8, centers=6, seed=13)
    want = scipy_partition(metric, 12, method)
    ungrouped, ungrouped_rounds = cluster_with_rounds(metric[:1], 12, method, path="accelerator")
    for path in PATHS:
        labels, total_rounds = cluster_with_rounds(metric, 12, method, path=path)
        for got, expected in zip(labels, want):
            np.testing.assert_array_equal(canonical(got), expected)
        assert total_rounds == 0 if path == "cpu" else total_rounds >= ungrouped_rounds
