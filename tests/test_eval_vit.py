"""scripts/eval_vit.py end to end on tiny saved models and a tiny class-folder image set."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import eval_vit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
CLASSES = ("n01440764", "n01443537", "n01484850")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    rng = np.random.default_rng(0)
    for c, wnid in enumerate(CLASSES):
        (root / wnid).mkdir()
        for i, size in enumerate([(40, 36), (50, 64), (33, 33)]):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{c}{i}.{'JPEG' if i % 2 else 'png'}")
    (root / CLASSES[0] / "notes.txt").write_text("not an image")
    return root


def save_tiny(path, cls, config_cls, with_processor):
    torch.manual_seed(0)
    model = cls(config_cls(**TINY, num_labels=len(CLASSES))).eval()
    model.save_pretrained(path)
    if with_processor:
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    return model


def run(*argv):
    return eval_vit.main([str(a) for a in argv])


@pytest.mark.parametrize("with_processor", [True, False])
def test_eval_runs_end_to_end_and_reports_every_variant(tmp_path, image_folder, with_processor, capsys):
    cls, config_cls = (ViTForImageClassification, ViTConfig) if with_processor else (DeiTForImageClassificationWithTeacher, DeiTConfig)
    model = save_tiny(tmp_path / "model", cls, config_cls, with_processor)
    out = tmp_path / "results" / "eval.csv"
    rows = run(
        "--model", tmp_path / "model", "--imagenet-val", image_folder, "--method", "tome", "cis", "evit",
        "--tokens-per-block", 2, "--batch-size", 4, "--warmup", 1, "--csv", out,
    )
    with out.open() as f:
        written = list(csv.DictReader(f))
    assert [r["variant"] for r in written] == ["unpatched", "tome tokens_per_block=2", "cis tokens_per_block=2", "evit tokens_per_block=2"]
    assert written == [{k: str(v) for k, v in r.items()} for r in rows]
    assert all(r["images"] == "9" and r["batch_size"] == "4" and r["dtype"] == "float32" for r in written)
    assert written[0]["speedup"] == "1.000"
    assert all(float(r["images_per_s"]) > 0 for r in written)

    # the unpatched accuracy, recomputed here from the same preprocessing
    classes, samples = eval_vit.imagenet_samples(image_folder)
    assert classes == list(CLASSES) and len(samples) == 9
    preprocess = eval_vit.make_preprocess(str(tmp_path / "model"), 32)
    pixels = preprocess([Image.open(p).convert("RGB") for p, _ in samples])
    assert pixels.shape == (9, 3, 32, 32)
    with torch.no_grad():
        predictions = model(pixels).logits.argmax(-1)
    expected = 100 * (predictions == torch.tensor([c for _, c in samples])).float().mean().item()
    assert written[0]["top1"] == f"{expected:.2f}"
    printed = capsys.readouterr().out
    assert "unpatched" in printed and "cis tokens_per_block=2" in printed and "images_per_s" in printed


def test_standard_preprocessing_without_a_processor(tmp_path):
    save_tiny(tmp_path / "model", ViTForImageClassification, ViTConfig, with_processor=False)
    preprocess = eval_vit.make_preprocess(str(tmp_path / "model"), 32)
    image = Image.fromarray(np.full((20, 40, 3), 255, dtype=np.uint8))  # white, wider than high
    pixels = preprocess([image])
    assert pixels.shape == (1, 3, 32, 32)
    expected = (1 - torch.tensor(eval_vit.IMAGENET_MEAN)) / torch.tensor(eval_vit.IMAGENET_STD)
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), expected)


def test_eval_errors_name_the_problem(tmp_path, image_folder):
    save_tiny(tmp_path / "model", ViTForImageClassification, ViTConfig, with_processor=False)
    with pytest.raises(SystemExit, match="is not a directory"):
        run("--model", tmp_path / "model", "--imagenet-val", tmp_path / "missing")
    with pytest.raises(SystemExit, match="cannot load model"):
        run("--model", tmp_path / "no-model", "--imagenet-val", image_folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no class folders"):
        run("--model", tmp_path / "model", "--imagenet-val", tmp_path / "empty")
    (tmp_path / "two" / "a").mkdir(parents=True)
    (tmp_path / "two" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "two" / "a" / "x.png")
    with pytest.raises(SystemExit, match="has 2 class folders, the model predicts 3 classes"):
        run("--model", tmp_path / "model", "--imagenet-val", tmp_path / "two")
    with pytest.raises(SystemExit, match="tome r=0.7 tokens_per_block=2: ambiguous request"):
        run("--model", tmp_path / "model", "--imagenet-val", image_folder, "--r", 0.7, "--tokens-per-block", 2)
