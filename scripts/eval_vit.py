#!/usr/bin/env python
"""Top-1 accuracy and throughput of a ViT/DeiT classifier with and without sdmerge.

    python scripts/eval_vit.py --model facebook/deit-small-patch16-224 \\
        --imagenet-val /data/imagenet/val --method tome cis --tokens-per-block 13

Every batch is decoded once and run through the unpatched model and every requested method in
turn (interleaved, the order rotating from batch to batch, so the throughput ratios are
measured side by side). Throughput counts the
model's forward calls only (image decoding excluded), after ``--warmup`` untimed calls of each
variant on the first batch; batch size, dtype and device are written next to it.

Data: ImageNet validation in the class-folder layout (``DIR/<wnid>/*.JPEG``). The sorted folder
names give the class indices 0..K-1, which is the standard ImageNet-1k index that ImageNet
checkpoints predict; the model must have exactly K labels. Preprocessing: the model's image
processor (``preprocessor_config.json`` next to the weights) when there is one, else resize
of the shorter side to ``image_size / 0.875`` (bicubic), centre crop to ``image_size`` and
ImageNet mean/std normalisation.

Output: a CSV file (``--csv``) and a printed table, one row per variant.
"""

from __future__ import annotations

import argparse
import csv
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import sdmerge
from sdmerge.methods import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/
from eval.vit_variants import (  # noqa: E402
    Variant,
    add_schedule_arguments,
    logits_of,
    print_table,
    schedule_options,
    timed_forward,
)

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CSV_COLUMNS = [
    "variant", "method", "options", "images", "top1", "images_per_s", "speedup", "batch_size", "dtype", "device",
    "attn_implementation", "model",
]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def imagenet_samples(root: Path, limit_per_class: int | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(class folder names, [(image path, class index)])``: sorted folders are classes 0..K-1,
    files of each folder sorted by name (the first ``limit_per_class`` of them if given)."""
    if not root.is_dir():
        raise SystemExit(f"error: --imagenet-val {str(root)!r} is not a directory")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise SystemExit(f"error: {str(root)!r} has no class folders (expected DIR/<wnid>/<image> files)")
    samples = []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        samples += [(path, index) for path in files[:limit_per_class]]
    if not samples:
        raise SystemExit(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(root)!r}")
    return classes, samples


def load_model(name: str, attn_implementation: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(name, attn_implementation=attn_implementation, dtype=dtype)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: cannot load model {name!r} (a local folder or a hub id in the local cache): {error}")
    return model.to(device).eval()


def make_preprocess(name: str, image_size: int):
    """``[PIL images] -> [B, 3, S, S]`` float32: the model's image processor, or the standard
    resize / centre-crop / ImageNet normalisation when the model ships none."""
    from transformers import AutoImageProcessor

    try:
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None
    if processor is not None:
        return lambda images: processor(images=images, return_tensors="pt")["pixel_values"]
    resize = round(image_size / 0.875)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]

    def standard(images):
        batch = []
        for image in images:
            scale = resize / min(image.size)
            w, h = max(round(image.width * scale), image_size), max(round(image.height * scale), image_size)
            image = image.resize((w, h), Image.BICUBIC)
            left, top = (w - image_size) // 2, (h - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image_size, image_size, 3)
            batch.append((pixels.permute(2, 0, 1).float() / 255 - mean) / std)
        return torch.stack(batch)

    return standard


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="local folder or hub id of a ViT/DeiT classifier")
    parser.add_argument("--imagenet-val", required=True, type=Path, help="ImageNet val, class-folder layout")
    parser.add_argument("--method", nargs="+", default=["tome"], choices=[m for m, v in METHODS.items() if "vit" in v.models])
    add_schedule_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--limit-per-class", type=int, help="evaluate the first N images of every class")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward calls of every variant first")
    parser.add_argument("--workers", type=int, default=4, help="threads decoding images")
    parser.add_argument("--csv", type=Path, default=Path("eval_vit.csv"))
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size {args.batch_size} must be >= 1")
    classes, samples = imagenet_samples(args.imagenet_val, args.limit_per_class)
    dtype = DTYPES[args.dtype]
    model = load_model(args.model, args.attn_implementation, dtype, args.device)
    if model.config.num_labels != len(classes):
        raise SystemExit(
            f"error: {str(args.imagenet_val)!r} has {len(classes)} class folders, the model predicts "
            f"{model.config.num_labels} classes; folder i (sorted) must be the model's class i"
        )
    variants = [Variant(None)] + [Variant(m, schedule_options(args)) for m in args.method]
    for variant in variants:  # bad schedules fail here, before any image is read
        try:
            variant.install(model)
        except (TypeError, ValueError) as error:
            raise SystemExit(f"error: {variant.label}: {error}")
    preprocess = make_preprocess(args.model, model.config.image_size)

    def load(batch):
        with ThreadPoolExecutor(args.workers) as pool:
            images = list(pool.map(lambda s: Image.open(s[0]).convert("RGB"), batch))
        labels = torch.tensor([s[1] for s in batch])
        return preprocess(images).to(args.device, dtype), labels.to(args.device)

    correct = [0] * len(variants)
    seconds = [0.0] * len(variants)
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    with torch.inference_mode():
        first, _ = load(batches[0])
        for variant in variants:
            variant.install(model)
            for _ in range(args.warmup):
                model(first)
        for b, batch in enumerate(tqdm(batches, desc="batches", unit="batch", file=sys.stderr)):
            pixel_values, labels = load(batch)
            for i in np.roll(np.arange(len(variants)), b):  # no variant always runs right after decoding
                variant = variants[i]
                variant.install(model)
                output, elapsed = timed_forward(model, pixel_values)
                seconds[i] += elapsed
                correct[i] += (logits_of(output).argmax(dim=-1) == labels).sum().item()
    sdmerge.remove(model)

    baseline = len(samples) / seconds[0]
    rows = []
    for i, variant in enumerate(variants):
        throughput = len(samples) / seconds[i]
        rows.append({
            "variant": variant.label, "method": variant.method or "", "options": variant.options,
            "images": len(samples), "top1": f"{100 * correct[i] / len(samples):.2f}",
            "images_per_s": f"{throughput:.1f}", "speedup": f"{throughput / baseline:.3f}",
            "batch_size": args.batch_size, "dtype": args.dtype, "device": args.device,
            "attn_implementation": args.attn_implementation, "model": args.model,
        })
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{args.model}: {len(samples)} images of {len(classes)} classes, batch {args.batch_size}, "
          f"{args.dtype}, {args.device}, attention {args.attn_implementation}; throughput = forward calls only")
    print_table(rows, ["variant", "top1", "images_per_s", "speedup"])
    print(f"written: {args.csv}")
    return rows


if __name__ == "__main__":
    main()
