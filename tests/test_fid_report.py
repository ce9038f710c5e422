"""The result files: results.csv, results.md in the shape of ATC Table 2, the plot, the image grid."""

import csv
import sys

import numpy as np
import pytest
from PIL import Image

from eval import report
from eval.report import ArmResult
from eval.worklist import make_arms


def results_for(fids: dict, seconds: dict) -> list[ArmResult]:
    arms = make_arms(["tome", "atc_average"], [0.9, 0.5])
    return [ArmResult(a, fids[a.name], 20, seconds[a.name], 0.01, 20, "cuda: test GPU") for a in arms]


FIDS = {"baseline": 33.80, "tome_r0.9": 33.77, "tome_r0.5": 33.63, "atc_average_r0.9": 33.51, "atc_average_r0.5": 33.90}
SECONDS = {"baseline": 2.0, "tome_r0.9": 1.9, "tome_r0.5": 1.6, "atc_average_r0.9": 2.5, "atc_average_r0.5": 2.2}


def test_markdown_has_table_2_shape_with_best_marked(tmp_path):
    """The 100 column holds one arm (the unpatched model in every row): nothing to rank, no mark."""
    report.write_markdown(
        tmp_path / "r.md", results_for(FIDS, SECONDS), {"dtype": "float16", "versions": {"torch": "x"}}, ["NOTE"]
    )
    text = (tmp_path / "r.md").read_text()
    assert "> NOTE" in text
    fid_table = text.split("## FID (lower is better)\n\n")[1].split("\n\n")[0].splitlines()
    assert fid_table == [
        "| r (%) | 100 | 90 | 50 |",
        "|---|---|---|---|",
        "| tome | 33.80 | 33.77 | <u>**33.63**</u> |",  # 100 column: the unpatched model in every row
        "| atc_average | 33.80 | <u>**33.51**</u> | 33.90 |",
    ]
    speed_table = (
        text.split("## Seconds per image (speed-up over the unpatched model)\n\n")[1].split("\n\n")[0].splitlines()
    )
    assert speed_table[2] == "| tome | 2 s | **1.9 s (1.05x)** | <u>**1.6 s (1.25x)**</u> |"
    assert speed_table[3] == "| atc_average | <u>2 s</u> | 2.5 s (0.80x) | 2.2 s (0.91x) |"
    assert '- **versions**: {"torch": "x"}' in text and "- **dtype**: float16" in text


def test_markdown_of_a_baseline_only_sweep(tmp_path):
    only = results_for(FIDS, SECONDS)[:1]
    report.write_markdown(tmp_path / "r.md", only, {}, [])
    assert "| baseline | 33.80 |" in (tmp_path / "r.md").read_text()  # nothing to compare: no mark


def test_csv_has_one_row_per_arm_with_provenance(tmp_path):
    results = results_for(FIDS, SECONDS)
    report.write_csv(
        tmp_path / "r.csv", results, {"dtype": "float16", "reference_images": 5000, "versions": {"torch": "x"}}
    )
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["arm"] for r in rows] == ["baseline", "tome_r0.9", "tome_r0.5", "atc_average_r0.9", "atc_average_r0.5"]
    assert rows[2]["method"] == "tome" and float(rows[2]["keep_rate"]) == 0.5 and float(rows[2]["fid"]) == 33.63
    assert float(rows[2]["speedup_vs_baseline"]) == pytest.approx(1.25)
    assert rows[0]["method"] == "" and rows[0]["images"] == "20" and rows[0]["devices"] == "cuda: test GPU"
    assert all(
        r["dtype"] == "float16" and r["reference_images"] == "5000" and r["versions"] == '{"torch": "x"}' for r in rows
    )
    with pytest.raises(ValueError, match="would overwrite result columns"):
        report.write_csv(tmp_path / "bad.csv", results, {"fid": "a provenance field named like a column"})


def test_plan_reuse_settings_are_rows_of_their_own_and_columns_of_the_csv(tmp_path):
    arms = make_arms(["atc_average"], [0.9, 0.5], plan_every=[1, 5], share_plans=[False, True])
    fids = {a.name: 30.0 + i for i, a in enumerate(arms)}
    results = [ArmResult(a, fids[a.name], 20, 1.0 + i / 10, 0.01, 20, "cpu") for i, a in enumerate(arms)]
    report.write_markdown(tmp_path / "r.md", results, {}, [])
    table = (tmp_path / "r.md").read_text().split("## FID (lower is better)\n\n")[1].split("\n\n")[0].splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| atc_average",
        "| atc_average_shared",
        "| atc_average_every5",
        "| atc_average_shared_every5",
    ]
    assert table[5] == "| atc_average_shared_every5 | <u>30.00</u> | 37.00 | 38.00 |"
    report.write_csv(tmp_path / "r.csv", results, {})
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [(r["arm"], r["plan_every"], r["share_plans"]) for r in rows[::2]] == [
        ("baseline", "1", "False"),
        ("atc_average_r0.5", "1", "False"),
        ("atc_average_r0.5_shared", "1", "True"),
        ("atc_average_r0.5_every5", "5", "False"),
        ("atc_average_r0.5_shared_every5", "5", "True"),
    ]
    assert report.write_plot(tmp_path / "plot.png", results)


def test_plot_is_written_with_matplotlib_and_skipped_without(tmp_path, monkeypatch):
    """matplotlib is in the dev extra (for this test); users without the plots extra get no plot."""
    results = results_for(FIDS, SECONDS)
    assert report.write_plot(tmp_path / "plot.png", results)
    assert Image.open(tmp_path / "plot.png").size[0] > 500
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert not report.write_plot(tmp_path / "none.png", results)
    assert not (tmp_path / "none.png").exists()


def test_image_grid_has_one_row_per_arm_and_one_column_per_class(tmp_path):
    paths = []
    for j, colour in enumerate(["red", "blue"]):
        paths.append(tmp_path / f"{j}.png")
        Image.new("RGB", (32, 32), colour).save(paths[-1])
    rows = [("baseline", paths), ("tome_r0.5", paths[::-1])]
    report.write_image_grid(tmp_path / "grid.png", rows, ["magpie", "volcano"], tile=16)
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    width, height = grid.size
    assert width == 170 + 2 * 16
    assert grid.getpixel((170 + 8, height - 32 + 8)) == (255, 0, 0)
    assert grid.getpixel((170 + 8, height - 16 + 8)) == (0, 0, 255)
    assert grid.getpixel((170 + 16 + 8, height - 16 + 8)) == (255, 0, 0)


def test_grid_titles_and_labels_wrap_instead_of_being_cut():
    assert report.wrap("golden retriever", lambda line: len(line) <= 9) == ["golden", "retriever"]
    assert report.wrap("golden retriever", lambda line: len(line) <= 20) == ["golden retriever"]
    assert report.wrap("atc_average_r0.5_shared_every5", lambda line: len(line) <= 10) == [
        "atc_averag",
        "e_r0.5_sha",
        "red_every5",
    ]
    assert report.wrap("a b", lambda line: False) == ["a", "b"]  # a character that never fits still shows


def red_rows(image: Image.Image) -> list[int]:
    """The rows of ``image`` that hold a strongly red pixel (the banner's colour)."""
    rgb = np.asarray(image.convert("RGB")).astype(int)
    red = (rgb[..., 0] > 150) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)
    return np.flatnonzero(red.any(axis=1)).tolist()


def test_a_banner_marks_every_output_of_a_smoke_run(tmp_path):
    png = tmp_path / "grey.png"
    Image.new("RGB", (8, 8), "grey").save(png)
    titles = ["magpie", "golden retriever", "balloon", "volcano"]
    report.write_image_grid(tmp_path / "plain.png", [("baseline", [png] * 4)], titles, tile=64)
    report.write_image_grid(tmp_path / "smoke.png", [("baseline", [png] * 4)], titles, tile=64, banner="SMOKE TEST")
    assert red_rows(Image.open(tmp_path / "plain.png")) == []
    banner_rows = red_rows(Image.open(tmp_path / "smoke.png"))
    assert banner_rows and max(banner_rows) < 24  # on top
    assert Image.open(tmp_path / "smoke.png").size[1] > Image.open(tmp_path / "plain.png").size[1]

    results = results_for(FIDS, SECONDS)
    assert report.write_plot(tmp_path / "plot.png", results) and report.write_plot(tmp_path / "sp.png", results, "S")
    assert red_rows(Image.open(tmp_path / "sp.png"))[0] < 40 and red_rows(Image.open(tmp_path / "plot.png")) == []

    report.write_markdown(tmp_path / "r.md", results, {}, [], banner=report.SMOKE_BANNER)
    assert (tmp_path / "r.md").read_text().startswith(f"# FID sweep results ({report.SMOKE_BANNER})\n")


def test_cells_that_tie_as_printed_get_no_mark(tmp_path):
    fids = {**FIDS, "tome_r0.5": 33.634, "atc_average_r0.5": 33.631}  # both print as 33.63
    report.write_markdown(tmp_path / "r.md", results_for(fids, SECONDS), {}, [])
    table = (tmp_path / "r.md").read_text().split("## FID (lower is better)\n\n")[1].split("\n\n")[0].splitlines()
    assert table[2:] == [
        "| tome | 33.80 | 33.77 | <u>33.63</u> |",  # best of its row, but tied in its column
        "| atc_average | 33.80 | <u>**33.51**</u> | 33.63 |",
    ]


def test_plot_axes_do_not_magnify_differences_far_below_the_values():
    low, high = report.y_limits([1.2272, 1.2291])  # the smoke preset's FIDs
    assert high - low >= report.MIN_RELATIVE_SPAN * 1.228 and low < 1.2272 and high > 1.2291
    low, high = report.y_limits([33.2, 36.9])  # a real spread is drawn as it is, with a margin
    assert low == pytest.approx(33.2 - 0.1 * 1.85) and high == pytest.approx(36.9 + 0.1 * 1.85)
    assert report.y_limits([0.0, 0.0]) == (-1.0, 1.0)


def test_the_atc_papers_table_2_numbers_get_the_papers_marks(tmp_path):
    """ATC Table 2 (FID, keep rate 100..40%): bold = best per column, underlined = best per row
    (the paper also bolds the 100 column, which holds the one unpatched model)."""
    rates = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    paper = {
        "tome": [33.77, 33.61, 33.59, 33.57, 33.63, 33.67],
        "atc_single": [33.63, 33.48, 33.53, 33.43, 34.01, 36.95],
        "atc_average": [33.51, 33.45, 33.33, 33.40, 33.36, 33.22],
    }
    arms = make_arms(list(paper), rates)
    fids = {"baseline": 33.80} | {a.name: paper[a.method][rates.index(a.keep_rate)] for a in arms[1:]}
    results = [ArmResult(a, fids[a.name], 2000, None, None, 0, "") for a in arms]
    report.write_markdown(tmp_path / "r.md", results, {}, [])
    table = (tmp_path / "r.md").read_text().split("## FID (lower is better)\n\n")[1].split("\n\n")[0].splitlines()
    assert table[2:] == [
        "| tome | 33.80 | 33.77 | 33.61 | 33.59 | <u>33.57</u> | 33.63 | 33.67 |",
        "| atc_single | 33.80 | 33.63 | 33.48 | 33.53 | <u>33.43</u> | 34.01 | 36.95 |",
        "| atc_average | 33.80 | **33.51** | **33.45** | **33.33** | **33.40** | **33.36** | <u>**33.22**</u> |",
    ]
