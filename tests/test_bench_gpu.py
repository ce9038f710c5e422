"""scripts/bench_gpu.py runs end to end on the CPU at tiny sizes (``--device cpu --quick``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_dit  # noqa: E402
import bench_gpu  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rows(report: str, first_cell: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip("|").split("|")]
        for line in report.splitlines()
        if line.startswith(f"| {first_cell}")
    ]


def test_quick_cpu_run_writes_every_section(tmp_path):
    out = tmp_path / "bench.md"
    report = bench_gpu.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert out.read_text() == report
    assert "no GPU" in report and "dtype float32" in report and "torch 2." in report
    step_table = next(table for table in report.split("\n\n") if "s/step" in table)
    steps = [line for line in step_table.splitlines() if line.startswith("| sdmerge ")]
    assert [line.split(" | ")[0].removeprefix("| sdmerge ").removesuffix(" r=0.4") for line in steps] == list(
        bench_gpu.SD_METHODS
    )
    assert any(line.startswith("| sdmerge atc_average r=0.4, share_plans, plan_every=5 |") for line in report.splitlines())
    assert any(line.startswith("| sdmerge grid r=0.25, kv_only |") for line in report.splitlines())  # the modes
    clustering = [row for linkage in bench_gpu.LINKAGES for row in _rows(report, linkage + " |")]
    assert [(row[0], row[1]) for row in clustering] == [
        (linkage, path) for linkage in bench_gpu.LINKAGES for path in ("cpu", "accelerator")
    ]
    assert all(row[-1] == "yes" for row in clustering)  # partitions equal scipy's
    assert all(float(row[6]) <= 2 for row in clustering if row[1] == "accelerator")  # host syncs per round
    vit = _rows(report, "DeiT-S")
    assert [row[1] for row in vit] == ["unpatched"] + [f"{m} tokens_per_block=13" for m in bench_gpu.VIT_METHODS]
    assert all(float(row[2]) > 0 for row in vit)
    dit = [table for table in report.split("\n\n") if table.startswith(("| SD3-Medium (tiny", "| PixArt-Sigma (tiny"))]
    assert len(dit) == 2 and all("wall s/call" in table and "cpu s/call" not in table for table in dit)
    for table in dit:  # every arm, and its speed-up beside the FLOP bound of the full step
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
        assert [row[0] for row in rows] == [label for label, *_ in bench_dit.ARMS.values()]
        assert all(float(row[5]) >= 1 for row in rows)
    assert "goal" not in report  # issue 21's goals are for the CPU


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cuda"])
    assert "no CUDA device is available here" in capsys.readouterr().err
