"""The Fréchet distance against scipy and torchmetrics, and the feature statistics of image files."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance

from eval.fid import FeatureExtractor, GaussianStats, frechet_distance, image_batches, image_statistics


def scipy_frechet(x: np.ndarray, y: np.ndarray) -> float:
    """The textbook computation (as pytorch-fid): scipy's matrix square root of S_x S_y."""
    mu_x, mu_y = x.mean(0), y.mean(0)
    s_x, s_y = np.atleast_2d(np.cov(x, rowvar=False)), np.atleast_2d(np.cov(y, rowvar=False))
    root = scipy.linalg.sqrtm(s_x @ s_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(s_x + s_y - 2 * root))


def correlated(rng, n, d, shift):
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift


@pytest.mark.parametrize("dims", [1, 3, 8, 16])
def test_matches_scipy_on_random_features(dims):
    rng = np.random.default_rng(dims)
    x, y = correlated(rng, 200, dims, 0.0), correlated(rng, 150, dims, 0.5)
    ours = frechet_distance(GaussianStats.of(x), GaussianStats.of(y))
    assert ours == pytest.approx(scipy_frechet(x, y), rel=1e-9, abs=1e-9)
    assert ours > 0.1


def test_properties():
    rng = np.random.default_rng(0)
    x, y = correlated(rng, 100, 6, 0.0), correlated(rng, 100, 6, 1.0)
    a, b = GaussianStats.of(x), GaussianStats.of(y)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)
    one_d = GaussianStats(np.array([1.0]), np.array([[4.0]]), 10), GaussianStats(np.array([3.0]), np.array([[9.0]]), 10)
    assert frechet_distance(*one_d) == pytest.approx((1 - 3) ** 2 + (2 - 3) ** 2)  # (mu diff)^2 + (sigma diff)^2
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(a, GaussianStats.of(x[:, :5]))


class Identity(torch.nn.Module):
    num_features = 12

    def forward(self, features):
        return features


@pytest.mark.parametrize("n", [40, 8])  # more samples than dimensions, and fewer (singular covariances)
def test_matches_torchmetrics_fid(n):
    rng = np.random.default_rng(n)
    x, y = correlated(rng, n, 12, 0.0), correlated(rng, n + 3, 12, 0.3)
    metric = FrechetInceptionDistance(feature=Identity()).double()
    metric.update(torch.from_numpy(x), real=True)
    metric.update(torch.from_numpy(y), real=False)
    expected = float(metric.compute())
    assert frechet_distance(GaussianStats.of(x), GaussianStats.of(y)) == pytest.approx(expected, rel=1e-6)


def test_statistics_round_trip_through_a_file_with_their_provenance(tmp_path):
    stats = GaussianStats.of(np.random.default_rng(0).normal(size=(10, 4)))
    stats.save(tmp_path / "s.npz", provenance="A")
    loaded = GaussianStats.load(tmp_path / "s.npz", provenance="A")
    np.testing.assert_array_equal(loaded.cov, stats.cov)
    assert loaded.count == 10
    assert GaussianStats.load(tmp_path / "s.npz", provenance="B") is None
    assert GaussianStats.load(tmp_path / "missing.npz", provenance="A") is None
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left


def test_images_of_different_sizes_are_batched_by_size(tmp_path):
    sizes = [(8, 6), (8, 6), (6, 8), (8, 6), (8, 6), (8, 6)]
    paths = []
    for j, (w, h) in enumerate(sizes):
        paths.append(tmp_path / f"{j}.png")
        Image.new("RGB", (w, h), (j, 2 * j, 3 * j)).save(paths[-1])
    batches = list(image_batches(paths, batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 6, 8), (1, 3, 8, 6), (2, 3, 6, 8), (1, 3, 6, 8)]
    assert batches[1].dtype == torch.uint8 and batches[1][0, :, 0, 0].tolist() == [2, 4, 6]

    class ChannelMeans(torch.nn.Module):
        def forward(self, images):
            return images.float().mean(dim=(2, 3))

    seen = []
    stats = image_statistics(paths, FeatureExtractor(ChannelMeans(), {}), torch.device("cpu"), 2, seen.append)
    assert seen == [2, 1, 2, 1] and stats.count == 6
    np.testing.assert_allclose(stats.mean, [2.5, 5.0, 7.5])
