"""Reference selection on fake ImageNet validation trees, and the cached reference statistics."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval.errors import UserError
from eval.fid import FeatureExtractor
from eval.reference import reference_provenance, reference_statistics, select_reference

WNIDS = ["n01530575", "n01440764", "n01443537"]  # deliberately unsorted


def write_image(path: Path, value: int, size=(12, 10)) -> None:
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def class_folder_tree(root: Path) -> dict[str, list[str]]:
    """Seven images per class, written in shuffled order, plus files that are not images."""
    names = {}
    for k, wnid in enumerate(WNIDS):
        (root / wnid).mkdir(parents=True)
        stems = [f"ILSVRC2012_val_{k * 100 + j:08d}" for j in (6, 2, 4, 0, 5, 1, 3)]
        for j, stem in enumerate(stems):
            write_image(root / wnid / f"{stem}.JPEG", 10 * k + j)
        (root / wnid / "notes.txt").write_text("not an image")
        names[wnid] = sorted(f"{s}.JPEG" for s in stems)[:5]
    return names


def test_class_folders_first_five_by_name_in_sorted_wnid_order(tmp_path):
    expected = class_folder_tree(tmp_path)
    selected = select_reference(tmp_path, WNIDS)
    assert len(selected) == 15
    assert [(p.parent.name, p.name) for p in selected] == [(w, n) for w in sorted(WNIDS) for n in expected[w]]


def flat_tree(root: Path) -> list[tuple[str, str]]:
    """Flat files (shuffled labels), returns ``(file name, wnid)`` pairs in name order."""
    root.mkdir()
    pairs = []
    for j in range(18):
        name = f"ILSVRC2012_val_{j + 1:08d}.JPEG"
        wnid = WNIDS[(j * 7) % 3]
        write_image(root / name, j)
        pairs.append((name, wnid))
    return pairs


def expected_flat(pairs) -> list[str]:
    return [name for w in sorted(WNIDS) for name in sorted(n for n, x in pairs if x == w)[:5]]


def test_flat_files_with_a_two_column_label_file_and_header(tmp_path):
    pairs = flat_tree(tmp_path / "val")
    labels = tmp_path / "LOC_val_solution.csv"
    rows = [f"{Path(n).stem},{w} 10 20 30 40" for n, w in reversed(pairs)]  # stems, any order, boxes after
    labels.write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    selected = select_reference(tmp_path / "val", WNIDS, label_file=labels)
    assert [p.name for p in selected] == expected_flat(pairs)


def test_flat_files_with_a_one_column_label_file(tmp_path):
    pairs = flat_tree(tmp_path / "val")
    labels = tmp_path / "synset_labels.txt"
    labels.write_text("\n".join(w for _, w in pairs) + "\n")
    selected = select_reference(tmp_path / "val", WNIDS, label_file=labels)
    assert [p.name for p in selected] == expected_flat(pairs)


def test_missing_or_short_references_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="--imagenet-val: no folder .*--preset smoke"):
        select_reference(tmp_path / "nowhere", WNIDS)
    class_folder_tree(tmp_path / "tree")
    with pytest.raises(UserError, match="1 class folder.* n09999999"):
        select_reference(tmp_path / "tree", WNIDS + ["n09999999"])
    with pytest.raises(UserError, match="fewer than 8 images, e.g. n01440764 \\(7\\)"):
        select_reference(tmp_path / "tree", WNIDS, per_class=8)
    flat_tree(tmp_path / "flat")
    with pytest.raises(UserError, match="--imagenet-val-labels"):
        select_reference(tmp_path / "flat", WNIDS)


def test_bad_label_files_are_clear_errors(tmp_path):
    pairs = flat_tree(tmp_path / "val")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"{n} {w}" for n, w in pairs[:-1]))
    with pytest.raises(UserError, match="1 image file.* no label, e.g. ILSVRC2012_val_00000018.JPEG"):
        select_reference(tmp_path / "val", WNIDS, label_file=labels)
    labels.write_text("\n".join(f"{n} {j % 3}" for j, (n, _) in enumerate(pairs)))
    with pytest.raises(UserError, match="not a WordNet id"):
        select_reference(tmp_path / "val", WNIDS, label_file=labels)
    labels.write_text("\n".join(w for _, w in pairs[:-2]))
    with pytest.raises(UserError, match="16 labels .* for 18 image files"):
        select_reference(tmp_path / "val", WNIDS, label_file=labels)
    with pytest.raises(UserError, match="--imagenet-val-labels: no file"):
        select_reference(tmp_path / "val", WNIDS, label_file=tmp_path / "missing.txt")


class CountingMean(torch.nn.Module):
    """Features = per-channel mean and a fixed random projection of it; counts the images seen."""

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.projection = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))

    def forward(self, images):
        self.seen += len(images)
        means = images.float().mean(dim=(2, 3))
        return torch.cat([means, means @ self.projection], dim=1)


def test_reference_statistics_are_cached_with_their_provenance(tmp_path):
    class_folder_tree(tmp_path / "val")
    files = select_reference(tmp_path / "val", WNIDS)
    module = CountingMean()
    extractor = FeatureExtractor(module, {"name": "counting mean", "resize": "none"})
    cache = tmp_path / "out" / "reference_stats.npz"
    provenance = reference_provenance(files, tmp_path / "val", 5, extractor)
    assert provenance["count"] == 15 and provenance["extractor"]["name"] == "counting mean"

    first, reused = reference_statistics(files, provenance, extractor, cache, torch.device("cpu"))
    assert not reused and module.seen == 15 and first.count == 15
    again, reused = reference_statistics(files, provenance, extractor, cache, torch.device("cpu"))
    assert reused and module.seen == 15  # nothing recomputed
    np.testing.assert_array_equal(again.mean, first.mean)
    np.testing.assert_array_equal(again.cov, first.cov)

    other = FeatureExtractor(module, {"name": "counting mean", "resize": "bicubic"})
    changed = reference_provenance(files, tmp_path / "val", 5, other)
    _, reused = reference_statistics(files, changed, other, cache, torch.device("cpu"))
    assert not reused and module.seen == 30  # another extractor: recomputed

    write_image(files[0], 200, size=(14, 10))  # a reference file changed on disk
    changed = reference_provenance(files, tmp_path / "val", 5, other)
    assert changed["files_sha256"] != provenance["files_sha256"]
    _, reused = reference_statistics(files, changed, other, cache, torch.device("cpu"))
    assert not reused and module.seen == 45
