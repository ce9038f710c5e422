"""The FID reference set: the first images of every ImageNet-1k validation class, and their
cached feature statistics.

Selection (the ATC protocol): classes in sorted-wnid order; in each class its image files
sorted by name, the first ``per_class`` (5) of them; 5000 images for the 1000 classes. Two layouts:

- class folders: ``DIR/n01440764/ILSVRC2012_val_00000293.JPEG``, one folder per wnid;
- flat files plus a label file (``--imagenet-val-labels``): ``DIR/ILSVRC2012_val_00000001.JPEG``
  and either
  - one ``<file name or stem> <wnid>`` pair per line, comma or whitespace separated, in any
    order; a header line is allowed and lines naming files not in the folder are ignored
    (``LOC_val_solution.csv`` works as it is: the first token after the comma is the wnid); or
  - one wnid per line, labelling the image files in name order
    (``imagenet_2012_validation_synset_labels.txt``).
  Labels must be wnids: integer labels are ambiguous (the devkit's ILSVRC2012_ID order is not
  the sorted-wnid class index). Every image file in the folder must have a label.

Image files are ``.jpeg``, ``.jpg`` and ``.png`` (any case); other files are ignored.

The statistics of the selection are cached in one ``.npz`` with their provenance (selection
rule, count, a digest of the selected files' names and contents, the extractor's identity); a
rerun reuses them only when the provenance is identical, and recomputes them otherwise.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .errors import OFFLINE_HINT, UserError
from .fid import FeatureExtractor, GaussianStats, image_statistics
from .imagenet_classes import WNID_PATTERN

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}
PER_CLASS = 5
HINT = (
    "Pass --imagenet-val DIR: the ImageNet-1k validation images in class folders (DIR/n01440764/...), "
    f"or flat with --imagenet-val-labels FILE; {OFFLINE_HINT}"
)


def reference_definition(per_class: int = PER_CLASS) -> str:
    return f"ImageNet-1k val, first {per_class} images per class (files sorted by name), classes in sorted-wnid order"


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()), key=lambda p: p.name
    )


def select_reference(
    root: Path, wnids: Sequence[str], per_class: int = PER_CLASS, label_file: Path | None = None
) -> list[Path]:
    """The first ``per_class`` images of each class in ``wnids`` (taken in sorted order).

    Returns ``len(wnids) * per_class`` paths, class by class. Raises :class:`UserError` when the
    folder, a class, or enough images of a class are missing, or the label file is malformed.
    """
    if not root.is_dir():
        raise UserError(f"--imagenet-val: no folder at {root}. {HINT}")
    if label_file is None:
        by_class = _class_folders(root, wnids)
    else:
        by_class = _labelled_files(root, label_file)
    selection = []
    short = []
    for wnid in sorted(wnids):
        files = by_class.get(wnid, [])
        if len(files) < per_class:
            short.append(f"{wnid} ({len(files)})")
        selection.extend(files[:per_class])
    if short:
        raise UserError(
            f"--imagenet-val {root}: {len(short)} class(es) have fewer than {per_class} images, e.g. "
            f"{', '.join(short[:5])}. {HINT}"
        )
    return selection


def _class_folders(root: Path, wnids: Sequence[str]) -> dict[str, list[Path]]:
    missing = [w for w in wnids if not (root / w).is_dir()]
    if missing:
        flat = (
            " It holds image files directly: pass their labels with --imagenet-val-labels FILE."
            if image_files(root)
            else ""
        )
        raise UserError(
            f"--imagenet-val {root}: {len(missing)} class folder(s) missing, "
            f"e.g. {', '.join(missing[:5])}.{flat} {HINT}"
        )
    return {w: image_files(root / w) for w in wnids}


def _labelled_files(root: Path, label_file: Path) -> dict[str, list[Path]]:
    if not label_file.is_file():
        raise UserError(f"--imagenet-val-labels: no file at {label_file}. {HINT}")
    files = image_files(root)
    by_stem = {p.stem: p for p in files}
    rows = [re.split(r"[,\s]+", line.strip()) for line in label_file.read_text().splitlines() if line.strip()]
    if rows and len(rows[0]) > 1 and Path(rows[0][0]).stem not in by_stem:
        rows = rows[1:]  # a header line such as "ImageId,PredictionString"
    if all(len(row) == 1 for row in rows):
        if len(rows) != len(files):
            raise UserError(
                f"--imagenet-val-labels {label_file}: {len(rows)} labels (one per line) for {len(files)} "
                f"image files in {root}; a one-column label file must label every image file in name order"
            )
        pairs = [(path, row[0]) for path, row in zip(files, rows, strict=True)]
    else:
        pairs = [(by_stem.get(Path(row[0]).stem), row[1] if len(row) > 1 else "") for row in rows]
        unlabelled = set(files) - {path for path, _ in pairs}
        if unlabelled:
            raise UserError(
                f"--imagenet-val-labels {label_file}: {len(unlabelled)} image file(s) in {root} have no label, "
                f"e.g. {min(unlabelled).name}"
            )
    by_class: dict[str, list[Path]] = {}
    for line, (path, wnid) in enumerate(pairs, 1):
        if not WNID_PATTERN.fullmatch(wnid):
            raise UserError(
                f"--imagenet-val-labels {label_file}: label {line} is {wnid!r}, not a WordNet id "
                f"(nXXXXXXXX); integer labels are ambiguous, convert them to wnids"
            )
        if path is not None:
            by_class.setdefault(wnid, []).append(path)
    return {wnid: sorted(paths, key=lambda p: p.name) for wnid, paths in by_class.items()}


def reference_provenance(files: Sequence[Path], root: Path, per_class: int, extractor: FeatureExtractor) -> dict:
    """What the reference statistics depend on: the selection (names and contents) and the extractor."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(
            f"{path.relative_to(root).as_posix()}\t{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode()
        )
    return {
        "definition": reference_definition(per_class),
        "count": len(files),
        "files_sha256": digest.hexdigest(),
        "extractor": extractor.identity,
    }


def reference_statistics(
    files: Sequence[Path],
    provenance: dict,
    extractor: FeatureExtractor,
    cache: Path,
    device: torch.device,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[GaussianStats, bool]:
    """The statistics of the reference ``files``, from ``cache`` when it holds them for this exact
    ``provenance``, else computed and written there. Returns ``(stats, reused)``."""
    key = json.dumps(provenance, sort_keys=True)
    cached = GaussianStats.load(cache, key)
    if cached is not None:
        return cached, True
    stats = image_statistics(files, extractor, device, on_batch=on_batch)
    stats.save(cache, key)
    return stats, False
