"""The sweep's result files: ``results.csv``, ``results.md``, the plot and the image grid.

``results.md`` has the shape of the ATC paper's Table 2: one row per method (and plan-reuse
setting: ``atc_average_shared_every5`` is a row of its own), one column per keep rate in
percent, the unpatched model's FID in the 100 column of every row; the best (lowest) value of
every column in bold, the best of every row underlined. A second table
gives seconds per image and the speed-up over the unpatched model in the same shape.
A mark means one arm's value, as printed, is lower than every other arm's in its column or row:
no mark where the lowest printed values tie, or where a column holds one arm only (the 100
column: the unpatched model in every row).

Every output of a run can carry a ``banner`` (the smoke preset's: :data:`SMOKE_BANNER`): in the
title of ``results.md``, on top of the plot and of the image grid, so that no file of a smoke
run passes for a result.
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
SMOKE_BANNER = "SMOKE TEST: tiny random model, the numbers check the machinery only"
MIN_RELATIVE_SPAN = 0.1
"""The plot's y axes span at least this fraction of the values' midpoint, so that differences far
below it (the smoke preset's FIDs of 1.2272 and 1.2291) are drawn as the near-equal values they are."""


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
    unranked), rounded as printed; ``cell(result)`` prints one."""
    baseline, patched = results[0], results[1:]
    rows: dict[str, dict[float, ArmResult]] = {}
    for r in patched:
        rows.setdefault(r.arm.row, {1.0: baseline})[r.arm.keep_rate] = r
    if not rows:
        rows = {baseline.arm.name: {1.0: baseline}}
    rates = sorted({rate for row in rows.values() for rate in row}, reverse=True)
    best_in_column = {rate: _best([row[rate] for row in rows.values() if rate in row], value) for rate in rates}
    lines = ["| r (%) | " + " | ".join(f"{rate * 100:g}" for rate in rates) + " |", "|---" * (len(rates) + 1) + "|"]
    for name, row in rows.items():
        best_in_row = _best(list(row.values()), value)
        cells = []
        for rate in rates:
            result = row.get(rate)
            text = "–" if result is None else cell(result)
            if result is not None and result is best_in_column[rate]:
                text = f"**{text}**"
            if result is not None and result is best_in_row:
                text = f"<u>{text}</u>"
            cells.append(text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _best(cells: list[ArmResult], value: Callable[[ArmResult], float | None]) -> ArmResult | None:
    """The arm whose value is lower than every other arm's among ``cells``; None if the lowest
    values tie or fewer than two arms have one (the same arm in several cells counts once)."""
    ranked = sorted({id(r): (v, r) for r in cells if (v := value(r)) is not None}.values(), key=lambda pair: pair[0])
    if len(ranked) < 2 or ranked[0][0] == ranked[1][0]:
        return None
    return ranked[0][1]


def write_markdown(
    path: Path,
    results: Sequence[ArmResult],
    provenance: dict,
    notes: Sequence[str],
    banner: str | None = None,
    subject: str | None = None,
) -> None:
    """``results.md``: the title (naming ``subject``, the model swept, and ``banner``), the FID
    table, the speed table, ``notes`` (warnings, skipped outputs), provenance."""
    baseline = results[0]

    def fid(r: ArmResult) -> float:
        return round(r.fid, 2)

    def seconds(r: ArmResult) -> float | None:
        return None if r.seconds_per_image is None else float(f"{r.seconds_per_image:.3g}")

    def seconds_cell(r: ArmResult) -> str:
        if r.seconds_per_image is None:
            return "n/a"
        speedup = _speedup(r, baseline)
        return f"{seconds(r):g} s" + ("" if r is baseline else f" ({speedup:.2f}x)")

    lines = ["# FID sweep results" + (f": {subject}" if subject else "") + (f" ({banner})" if banner else ""), ""]
    lines += [f"> {note}" for note in notes] + ([""] if notes else [])
    lines += ["## FID (lower is better)", ""]
    lines += _table(results, fid, lambda r: f"{fid(r):.2f}")
    lines += [
        "",
        "Best per column in **bold**, best per row <u>underlined</u>, where one arm is lower than all others as "
        "printed; the 100 column is the unpatched model.",
        "",
    ]
    lines += ["## Seconds per image (speed-up over the unpatched model)", ""]
    lines += _table(results, seconds, seconds_cell)
    lines += ["", "## Provenance", ""]
    lines += [f"- **{key}**: {_plain(value)}" for key, value in provenance.items()]
    write_text(path, "\n".join(lines) + "\n")


def write_plot(path: Path, results: Sequence[ArmResult], banner: str | None = None) -> bool:
    """FID and seconds per image against keep rate, one line per row (method and plan reuse)
    starting from the unpatched model at 100% (as Table 2's rows), which is also drawn dashed.
    Each axis spans at least :data:`MIN_RELATIVE_SPAN` of its values' midpoint, and its title
    states their range. Returns False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        return False
    baseline, patched = results[0], results[1:]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6 if banner else 4.2))
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
        values = [v for r in results if (v := value(r)) is not None]
        if values:
            axis.set_ylim(*y_limits(values))
            axis.set_title(f"all arms within {min(values):.4g} ... {max(values):.4g}", fontsize=10)
        axis.set_xlabel("keep rate r (%)")
        axis.set_ylabel(label)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    axes[0].legend()
    if banner:
        figure.suptitle(banner, color="red", fontweight="bold")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    write_atomically(path, lambda f: f.write(buffer.getvalue()))
    return True


def y_limits(values: Sequence[float]) -> tuple[float, float]:
    """An axis range around ``values`` (10% margin) spanning at least :data:`MIN_RELATIVE_SPAN`
    of their midpoint (1 if that is 0)."""
    low, high = min(values), max(values)
    middle = (low + high) / 2
    half = 1.1 * max((high - low) / 2, MIN_RELATIVE_SPAN * abs(middle) / 2) or 1.0
    return middle - half, middle + half


def write_image_grid(
    path: Path,
    rows: Sequence[tuple[str, Sequence[Path]]],
    column_titles: Sequence[str],
    tile: int,
    banner: str | None = None,
) -> None:
    """A grid as the ATC paper's Figure 6: one row per ``(label, image paths)``, one column per
    title, every image scaled to ``tile`` x ``tile`` pixels, labels on the left and on top, wrapped
    (never cut) to their space; ``banner`` in red above everything."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 3
    label_width = 170
    width = label_width + tile * len(column_titles)

    def wrapped(text: str, pixels: int) -> list[str]:
        return wrap(text, lambda line: measure.textlength(line, font=font) <= pixels)

    banner_lines = wrapped(banner, width - 12) if banner else []
    titles = [wrapped(title, tile - 6) for title in column_titles]
    top = 6 + line_height * len(banner_lines) + (6 if banner_lines else 0)
    header = top + line_height * max((len(lines) for lines in titles), default=0) + 6
    canvas = Image.new("RGB", (width, header + tile * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((6, 6), "\n".join(banner_lines), fill=(200, 0, 0), font=font, spacing=3)
    for j, lines in enumerate(titles):
        draw.multiline_text((label_width + j * tile + 3, top), "\n".join(lines), fill="black", font=font, spacing=3)
    for i, (label, paths) in enumerate(rows):
        row_top = header + i * tile
        lines = wrapped(label, label_width - 12)
        label_top = row_top + max(0, (tile - line_height * len(lines)) // 2)
        draw.multiline_text((6, label_top), "\n".join(lines), fill="black", font=font, spacing=3)
        for j, image_path in enumerate(paths):
            with Image.open(image_path) as image:
                canvas.paste(
                    image.convert("RGB").resize((tile, tile), Image.Resampling.LANCZOS),
                    (label_width + j * tile, row_top),
                )
    write_atomically(path, lambda f: canvas.save(f, format="PNG"))


def wrap(text: str, fits: Callable[[str], bool]) -> list[str]:
    """``text`` as lines that each ``fits``: words joined while they fit, a word that never fits
    split where it must. Every character but the spaces between lines is kept."""
    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] += f" {word}"
            continue
        while len(word) > 1 and not fits(word):
            cut = max((k for k in range(1, len(word)) if fits(word[:k])), default=1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines
