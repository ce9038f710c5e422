"""The smoke preset's made-on-the-spot parts: reference images and the feature network."""

import torch

from eval.reference import select_reference
from eval.smoke import build_reference_images, random_features

MAGPIE, VOLCANO = "n01582220", "n09472597"


def test_reference_images_depend_only_on_their_class_and_are_added_per_class(tmp_path):
    build_reference_images(tmp_path / "a", [MAGPIE], per_class=5)
    first = (tmp_path / "a" / MAGPIE / "ILSVRC2012_val_00000000.JPEG").read_bytes()
    build_reference_images(tmp_path / "a", [MAGPIE, VOLCANO], per_class=5)  # a rerun with one more class
    build_reference_images(tmp_path / "b", [VOLCANO], per_class=5)
    assert (tmp_path / "a" / MAGPIE / "ILSVRC2012_val_00000000.JPEG").read_bytes() == first
    for j in range(5):
        name = f"ILSVRC2012_val_{j:08d}.JPEG"
        assert (tmp_path / "a" / VOLCANO / name).read_bytes() == (tmp_path / "b" / VOLCANO / name).read_bytes()
    assert len(select_reference(tmp_path / "a", [MAGPIE, VOLCANO])) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left


def test_random_features_are_fixed_and_keep_their_scale():
    images = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = random_features(), random_features()
    features = a.module(images)
    assert features.shape == (4, 64)
    assert torch.equal(features, b.module(images))  # the same network every run
    assert 0.05 < features.std() < 10  # of order 1, not collapsing to 0
    assert "NOT Inception" in a.identity["name"]
