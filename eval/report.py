"""The sweep's result files: ``results.csv``, ``results.md``, the plot and the image grid.

``results.md`` has the shape of the ATC paper's Table 2: one row per method (and plan-reuse
setting: ``atc_average_shared_every5`` is a row of its own), one column per keep rate in
percent, the unpatched model's FID in the 100 column of every row; the best (lowest) value of
every column in bold, the best of every row underlined. A second table
gives seconds per image and the speed-up over the unpatched model in the same shape.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .atomic import write_atomically, write_text
from .worklist import Arm

CSV_COLUMNS = [
    "arm",
    "method",
    "keep_rate",
    "plan_every",
    "share_plans",
    "fid",
    "images",
    "seconds_per_image",
    "seconds_per_image_std",
    "timed_images",
    "speedup_vs_baseline",
    "devices",
]
PLOT_FILE = "fid_vs_keep_rate.png"
GRID_FILE = "image_grid.png"


@dataclass(frozen=True)
class ArmResult:
    arm: Arm
    fid: float
    images: int  # generated images the FID was computed on
    seconds_per_image: float | None  # mean over the timed images (None: no timings)
    seconds_per_image_std: float | None
    timed_images: int
    devices: str  # the devices the timed images were made on, "; "-separated


def _speedup(result: ArmResult, baseline: ArmResult) -> float | None:
    if result.seconds_per_image is None or baseline.seconds_per_image is None:
        return None
    return baseline.seconds_per_image / result.seconds_per_image


def _plain(value):
    """A provenance value as a CSV cell or Markdown text: strings and numbers as they are, the rest as JSON."""
    return value if isinstance(value, (str, int, float)) else json.dumps(value)


def write_csv(path: Path, results: Sequence[ArmResult], provenance: dict) -> None:
    """One row per arm: :data:`CSV_COLUMNS`, then every provenance field (the same in each row)."""
    clashes = set(CSV_COLUMNS) & set(provenance)
    if clashes:
        raise ValueError(f"provenance fields {sorted(clashes)} would overwrite result columns")
    baseline = results[0]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS + list(provenance))
    extra = [_plain(value) for value in provenance.values()]
    for r in results:
        row = [
            r.arm.name,
            r.arm.method or "",
            r.arm.keep_rate,
            r.arm.plan_every,
            r.arm.share_plans,
            r.fid,
            r.images,
            r.seconds_per_image,
            r.seconds_per_image_std,
            r.timed_images,
            _speedup(r, baseline),
            r.devices,
        ]
        writer.writerow(["" if value is None else value for value in row] + extra)
    write_text(path, buffer.getvalue())


def _table(
    results: Sequence[ArmResult], value: Callable[[ArmResult], float | None], cell: Callable[[ArmResult], str]
) -> list[str]:
    """Markdown lines in Table 2's shape. ``value(result)`` ranks cells (lower is better; None:
    unranked), ``cell(result)`` prints one."""
    baseline, patched = results[0], results[1:]
    rows: dict[str, dict[float, ArmResult]] = {}
    for r in patched:
        rows.setdefault(r.arm.row, {1.0: baseline})[r.arm.keep_rate] = r
    if not rows:
        rows = {baseline.arm.name: {1.0: baseline}}
    rates = sorted({rate for row in rows.values() for rate in row}, reverse=True)

    def best(cells) -> float | None:
        return min((v for r in cells if (v := value(r)) is not None), default=None)

    best_in_column = {rate: best(row[rate] for row in rows.values() if rate in row) for rate in rates}
    lines = ["| r (%) | " + " | ".join(f"{rate * 100:g}" for rate in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name, row in rows.items():
        best_in_row = best(row.values()) if len(row) > 1 else None
        cells = []
        for rate in rates:
            result = row.get(rate)
            text = "–" if result is None else cell(result)
            v = None if result is None else value(result)
            if v is not None and v == best_in_column[rate]:
                text = f"**{text}**"
            if v is not None and v == best_in_row:
                text = f"<u>{text}</u>"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(path: Path, results: Sequence[ArmResult], provenance: dict, notes: Sequence[str]) -> None:
    """``results.md``: the FID table, the speed table, ``notes`` (warnings, skipped outputs), provenance."""
    baseline = results[0]

    def seconds(r: ArmResult) -> str:
        if r.seconds_per_image is None:
            return "n/a"
        speedup = _speedup(r, baseline)
        return f"{r.seconds_per_image:.3g} s" + ("" if r is baseline else f" ({speedup:.2f}x)")

    lines = ["# FID sweep results", ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    lines += ["## FID (lower is better)", ""]
    lines += _table(results, lambda r: r.fid, lambda r: f"{r.fid:.2f}")
    lines += [
        "",
        "Best per column in **bold**, best per row <u>underlined</u>; the 100 column is the unpatched model.",
        "",
    ]
    lines += ["## Seconds per image (speed-up over the unpatched model)", ""]
    lines += _table(results, lambda r: r.seconds_per_image, seconds)
    lines += ["", "## Provenance", ""]
    lines += [f"- **{key}**: {_plain(value)}" for key, value in provenance.items()]
    write_text(path, "\n".join(lines) + "\n")


def write_plot(path: Path, results: Sequence[ArmResult]) -> bool:
    """FID and seconds per image against keep rate, one line per row (method and plan reuse)
    starting from the unpatched model at 100% (as Table 2's rows), which is also drawn dashed.
    Returns False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return False
    baseline, patched = results[0], results[1:]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, value, label in (
        (axes[0], lambda r: r.fid, "FID (lower is better)"),
        (axes[1], lambda r: r.seconds_per_image, "seconds per image"),
    ):
        if value(baseline) is not None:
            axis.axhline(value(baseline), color="black", linestyle="--", label="unpatched")
        for row in dict.fromkeys(r.arm.row for r in patched):
            arms = [baseline] + [r for r in patched if r.arm.row == row]
            points = sorted((r.arm.keep_rate * 100, value(r)) for r in arms if value(r) is not None)
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=row)
        axis.set_xlabel("keep rate r (%)")
        axis.set_ylabel(label)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    return True


def write_image_grid(
    path: Path, rows: Sequence[tuple[str, Sequence[Path]]], column_titles: Sequence[str], tile: int
) -> None:
    """A grid as the ATC paper's Figure 6: one row per ``(label, image paths)``, one column per
    title, every image scaled to ``tile`` x ``tile`` pixels, labels on the left and on top."""
    font = ImageFont.load_default()
    label_width, header = 170, 24
    canvas = Image.new("RGB", (label_width + tile * len(column_titles), header + tile * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(column_titles):
        draw.text((label_width + j * tile + 4, 6), title[: max(4, tile // 7)], fill="black", font=font)
    for i, (label, paths) in enumerate(rows):
        top = header + i * tile
        draw.text((6, top + tile // 2 - 6), label, fill="black", font=font)
        for j, image_path in enumerate(paths):
            with Image.open(image_path) as image:
                canvas.paste(
                    image.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS), (label_width + j * tile, top)
                )
    write_atomically(path, lambda f: canvas.save(f, format="PNG"))
