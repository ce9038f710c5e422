"""The sweep's model families: detection from a saved pipeline folder, loading, each family's
defaults, and one merged image per family through the sweep's own generation code."""

import inspect
import json
from pathlib import Path

import diffusers
import pytest
import torch

from eval.errors import UserError
from eval.families import FAMILIES, detect_family
from eval.generate import ImageMaker
from eval.library_output import quiet_libraries
from eval.worklist import Arm, make_work_list
from tests.tiny_diffusers import tiny_pipeline
from tests.tiny_dit import T5_TOKENS, tiny_pixart_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
NATIVE = 16 * 2  # every tiny pipeline's image side: sample_size 16 x VAE factor 2
TINY = {  # family: (the tests' tiny pipeline, its attention processor)
    "sd": (tiny_pipeline, "AttnProcessor2_0"),
    "sd3": (tiny_sd3_pipeline, "JointAttnProcessor2_0"),
    "pixart_sigma": (tiny_pixart_pipeline, "AttnProcessor2_0"),
    "pixart_alpha": (lambda: tiny_pixart_pipeline(sigma=False), "AttnProcessor2_0"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family's tiny pipeline saved with ``save_pretrained``: ``{family: folder}``."""
    root = tmp_path_factory.mktemp("models")
    for family, (build, _) in TINY.items():
        build().save_pretrained(root / family)
    return {family: str(root / family) for family in TINY}


@pytest.mark.parametrize("family", list(TINY))
def test_the_family_is_read_from_a_saved_folder_and_loads_and_merges(family, saved, capfd):
    """Detected from model_index.json, loaded by its own class, the family's defaults filled in,
    and an image made by a merging arm at the model's native size, with nothing printed."""
    quiet_libraries()
    found = detect_family(saved[family])
    assert found.name == family
    pipe = found.load(saved[family], CPU, torch.float32)
    index = json.loads((Path(saved[family]) / "model_index.json").read_text())
    assert type(pipe).__name__ == found.pipeline == index["_class_name"]
    settings = found.settings(pipe, steps=2)
    assert (settings.steps, settings.guidance_scale) == (2, found.guidance_scale)
    assert settings.resolution == NATIVE
    (item,) = make_work_list([Arm("tome", 0.5)], [18], 1)
    image, seconds = ImageMaker(pipe, settings, CPU)(item)
    assert image.size == (settings.resolution, settings.resolution) and seconds > 0
    recorded = found.as_loaded(pipe)  # what the results say of the pipeline
    assert recorded["attention_processors"] == [TINY[family][1]]
    assert recorded["safety_checker"] == ("off" if family == "sd" else "none in this pipeline")
    assert capfd.readouterr() == ("", "")  # no library notices (PixArt's caption cleaning is off, ...)


def test_the_protocol_defaults_are_the_pipelines_own():
    """Each family's steps and guidance are its diffusers pipeline's call defaults (SD 50 / 7.5,
    SD3 28 / 7.0, PixArt 20 / 4.5), and its extra call options are arguments of that call."""
    expected = {"sd": (50, 7.5), "sd3": (28, 7.0), "pixart_sigma": (20, 4.5), "pixart_alpha": (20, 4.5)}
    assert {f.name: (f.steps, f.guidance_scale) for f in FAMILIES} == expected
    for family in FAMILIES:
        parameters = inspect.signature(getattr(diffusers, family.pipeline).__call__).parameters
        assert parameters["num_inference_steps"].default == family.steps
        assert parameters["guidance_scale"].default == family.guidance_scale
        assert set(family.call_options) <= set(parameters)


def test_an_image_size_the_model_cannot_make_is_refused_naming_what_it_can():
    sd3, pixart = ([f for f in FAMILIES if f.name == name][0] for name in ("sd3", "pixart_sigma"))
    pipe = tiny_sd3_pipeline()  # VAE factor 2, patch 2, position embedding up to 24x24 tokens: 96x96 pixels
    call = {"num_inference_steps": 1, "max_sequence_length": T5_TOKENS}
    assert sd3.settings(pipe, resolution=96).resolution == 96
    pipe("a", height=96, width=96, **call)
    with pytest.raises(ValueError):  # diffusers' own limit, which the settings name first
        pipe("a", height=104, width=104, **call)
    for resolution in (30, 104, 2):
        with pytest.raises(
            UserError,
            match=f"--resolution {resolution}: must be a positive multiple of 4 up to 96 for this "
            "StableDiffusion3Pipeline \\(its native size: 32\\)",
        ):
            sd3.settings(pipe, resolution=resolution)
    with pytest.raises(UserError, match="--resolution 30: must be a positive multiple of 4 for this PixArtSigmaPip"):
        pixart.settings(tiny_pixart_pipeline(), resolution=30)


@pytest.mark.parametrize(
    "index, message",
    [
        ({"_class_name": "FluxPipeline"}, "is a FluxPipeline"),
        ({"_class_name": "StableDiffusionXLPipeline"}, "is a StableDiffusionXLPipeline"),
        ({"unet": ["diffusers", "UNet2DConditionModel"]}, "is a pipeline without a _class_name"),
    ],
)
def test_an_unknown_pipeline_class_is_refused_naming_the_supported_ones(index, message, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=message) as error:
        detect_family(str(tmp_path))
    for family in FAMILIES:
        assert family.pipeline in str(error.value)
    assert "the sweep runs StableDiffusionPipeline (Stable Diffusion 1.x / 2.x), StableDiffusion3Pipeline" in str(
        error.value
    )


def test_a_model_without_a_readable_model_index_names_the_flag(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    for model in ["/nonexistent/sd15", str(tmp_path), str(tmp_path / "broken")]:  # no folder, no file, no JSON
        with pytest.raises(UserError, match="--model: cannot read the model_index.json of .*--preset smoke"):
            detect_family(model)


def test_a_model_that_does_not_load_names_the_flag(tmp_path):
    (sd,) = [f for f in FAMILIES if f.name == "sd"]
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UserError, match="--model: cannot load a StableDiffusionPipeline from .*--preset smoke"):
        sd.load(str(tmp_path), CPU, torch.float32)
