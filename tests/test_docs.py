"""Every ```python block of README.md and docs/*.md runs as written, so docs and code cannot drift.

The blocks of one file run in order in one namespace. What a block would download or needs a GPU
for gets a stand-in from the tests' tiny models (:data:`STAND_INS`: ``from_pretrained`` and the
like, ``.to("cuda")``), and the names the docs leave to the reader (``pipe``, ``model``,
``pixel_values``, ...) get small values (:data:`PLACEHOLDERS`). A block that cannot run as written
is marked in the markdown, on the line right before its fence::

    <!-- not run: why -->

An unmarked block that raises fails the test, naming the file and line.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_diffusers import tiny_pipeline
from tests.torchvision_stand_in import import_timm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"<!--\s*not run:(.*?)-->")
GRID = 14  # the docs' ViT token grid (DeiT-S at 224x224: 14 x 14 patches); the stand-ins keep it
IMAGE_SIDE = 4 * GRID  # the stand-in ViTs' images: patches of 4 pixels


def doc_pipeline():
    """A tiny Stable Diffusion pipeline (tests.tiny_diffusers) for a downloaded one."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def doc_sd3_pipeline():
    """A tiny Stable Diffusion 3 pipeline (tests.tiny_dit) for a downloaded one."""
    from tests.tiny_dit import tiny_sd3_pipeline

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def doc_vit():
    """A tiny transformers ViT classifier with 12 blocks and the docs' 14 x 14 token grid."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=IMAGE_SIDE, patch_size=4, hidden_size=32, num_hidden_layers=12,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    return ViTForImageClassification(config).eval()


def doc_timm_vit():
    """A tiny timm VisionTransformer, shaped as :func:`doc_vit`."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=IMAGE_SIDE, patch_size=4, embed_dim=32, depth=12, num_heads=2, num_classes=10).eval()


def on_cpu(to: Callable) -> Callable:
    """``to`` with every CUDA device argument replaced by the CPU."""

    def cpu(value):
        return "cpu" if str(value).startswith("cuda") else value

    return lambda self, *args, **kwargs: to(self, *map(cpu, args), **{k: cpu(v) for k, v in kwargs.items()})


STAND_INS: dict[str, Callable[[Any], Any]] = {
    "diffusers.StableDiffusionPipeline.from_pretrained": lambda original: lambda *args, **kwargs: doc_pipeline(),
    "diffusers.StableDiffusion3Pipeline.from_pretrained": lambda original: lambda *args, **kwargs: doc_sd3_pipeline(),
    "diffusers.DiffusionPipeline.to": on_cpu,
    "transformers.AutoModelForImageClassification.from_pretrained": lambda original: lambda *a, **k: doc_vit(),
    "timm.create_model": lambda original: lambda *args, **kwargs: doc_timm_vit(),
}
"""``"library.owner.attribute"`` -> ``replacement(original)``: applied while a file's blocks run,
when one of them imports the library."""

PLACEHOLDERS: dict[str, Callable[[], Any]] = {
    "pipe": doc_pipeline,
    "prompt": lambda: "A high quality photograph of a magpie.",
    "path": lambda: "facebook/deit-small-patch16-224",
    "model": doc_vit,
    "pixel_values": lambda: torch.randn(2, 3, IMAGE_SIDE, IMAGE_SIDE, generator=torch.Generator().manual_seed(0)),
    "image": lambda: torch.rand(3, 224, 224, generator=torch.Generator().manual_seed(0)),  # 224: 14 and 16 divide it
    "labels": lambda: torch.arange(GRID * GRID) // 4,
    "H": lambda: GRID,
    "W": lambda: GRID,
}
"""Names the docs use without defining them -> their value (built only for a file that needs it)."""


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    code: str
    not_run: str | None  # the marker's reason


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, each with the reason of its marker, if any."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
        code = textwrap.dedent("\n".join(lines[i + 1 : end]))
        blocks.append(Block(i + 1, code, marker.group(1).strip() if marker else None))
        i = end + 1
    return blocks


def names_of(blocks: list[Block]) -> tuple[set[str], set[str], set[str]]:
    """``(libraries imported, names read, names bound)`` over ``blocks``."""
    imported, read, bound = set(), set(), set()
    for block in blocks:
        for node in ast.walk(ast.parse(block.code)):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
                bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
                bound |= {alias.asname or alias.name for alias in node.names}
            elif isinstance(node, ast.Name):
                (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
    return imported, read, bound


def library(name: str):
    """The library ``name``, imported (timm through the tests' torchvision stand-in); None if not installed."""
    if name == "timm":
        return import_timm()
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        return None


def run_blocks(doc: str, blocks: list[Block], monkeypatch) -> list[str]:
    """Run the unmarked blocks in order in one namespace, with the stand-ins and placeholders they
    need; returns one line per block that raised."""
    runnable = [block for block in blocks if block.not_run is None]
    imported, read, bound = names_of(runnable)
    for target, replacement in STAND_INS.items():
        name, *path, attribute = target.split(".")
        if name not in imported:
            continue
        owner = library(name)
        if owner is None:
            pytest.skip(f"{doc}: its blocks import {name}, which is not installed")
        for part in path:
            owner = getattr(owner, part)
        monkeypatch.setattr(owner, attribute, replacement(getattr(owner, attribute)))
    namespace = {"__name__": "__docs__"}
    namespace |= {name: PLACEHOLDERS[name]() for name in sorted(read - bound - set(dir(builtins))) if name in PLACEHOLDERS}
    failures = []
    for block in runnable:
        try:  # blank lines first: tracebacks give the markdown's line numbers
            exec(compile("\n" * block.line + block.code, doc, "exec"), namespace)
        except Exception as error:  # noqa: BLE001 (every failure is reported)
            failures.append(f"{doc}, block at line {block.line}: {type(error).__name__}: {error}")
    return failures


DOCS = [path.relative_to(ROOT).as_posix() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]


@pytest.mark.parametrize("doc", [doc for doc in DOCS if "```python" in (ROOT / doc).read_text()])
def test_every_python_block_runs_as_written(doc, monkeypatch):
    failures = run_blocks(doc, python_blocks(ROOT / doc), monkeypatch)
    assert not failures, "\n".join(failures) + "\n(a block that cannot run as written: mark it <!-- not run: why -->)"


@pytest.mark.parametrize("doc", DOCS)
def test_every_marker_names_a_reason_and_sits_right_before_a_python_block(doc):
    """A marker is an HTML comment on a line of its own (prose may quote one in backticks)."""
    lines = (ROOT / doc).read_text().splitlines()
    for i, line in enumerate(lines):
        marker = MARKER.match(line.strip())
        if marker is None:
            continue
        assert marker.group(1).strip(), f"{doc}:{i + 1}: a marker without a reason"
        assert line.strip() == marker.group(0) and i + 1 < len(lines) and lines[i + 1].strip() == "```python", (
            f"{doc}:{i + 1}: a marker must be alone on the line right before a ```python fence"
        )


def test_an_unmarked_block_that_raises_fails_and_a_marked_one_is_left_out(tmp_path, monkeypatch):
    (tmp_path / "doc.md").write_text(
        "# Doc\n\n```python\nx = 1\n```\n\n<!-- not run: pseudo-code -->\n```python\nf(*, y)\n```\n\n"
        "```python\n    y = x + undefined\n```\n"
    )
    blocks = python_blocks(tmp_path / "doc.md")
    assert [(b.line, b.not_run) for b in blocks] == [(3, None), (8, "pseudo-code"), (12, None)]
    failures = run_blocks("doc.md", blocks, monkeypatch)
    assert failures == ["doc.md, block at line 12: NameError: name 'undefined' is not defined"]
