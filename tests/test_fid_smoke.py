"""The smoke preset's made-on-the-spot parts: the tiny models, reference images and the feature network."""

import pytest
import torch

from eval.families import detect_family
from eval.imagenet_classes import imagenet_classes
from eval.reference import select_reference
from eval.smoke import TINY_FAMILIES, TOKEN_GRID, build_reference_images, build_tiny_pipeline, random_features

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


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """The smoke preset's tiny models, built into folders and loaded as the sweep loads them: ``{family: pipe}``."""
    root = tmp_path_factory.mktemp("tiny")
    models = {}
    for name in TINY_FAMILIES:
        build_tiny_pipeline(root / name, name)
        family = detect_family(str(root / name))
        assert family.name == name  # saved by the family's pipeline, recognised as it
        models[name] = (family, family.load(str(root / name), torch.device("cpu"), torch.float32))
    return models


def test_tiny_models_make_64_pixel_images_on_the_same_8x8_token_grid(tiny_models):
    for family, pipe in tiny_models.values():
        settings = family.settings(pipe)
        assert settings.resolution == family.native_resolution(pipe) == 64
        # the token grid of the merged blocks: the UNet's top level (VAE factor 8); SD3's patches (4 x patch 2)
        assert settings.resolution // family.size_multiple(pipe) == TOKEN_GRID == 8


def test_tiny_tokenizers_know_every_character_of_every_prompt(tiny_models):
    prompts = [c.prompt for c in imagenet_classes()]
    _, sd = tiny_models["sd"]
    _, sd3 = tiny_models["sd3"]
    for tokenizer in (sd.tokenizer, sd3.tokenizer, sd3.tokenizer_2, sd3.tokenizer_3):
        ids = tokenizer(prompts, add_special_tokens=False).input_ids  # CLIP: unknown = its end token
        assert all(tokenizer.unk_token_id not in prompt for prompt in ids), type(tokenizer).__name__


def test_a_tiny_model_of_another_family_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no tiny model of family 'flux'; there are: sd, sd3"):
        build_tiny_pipeline(tmp_path / "flux", "flux")
    assert not (tmp_path / "flux").exists()
