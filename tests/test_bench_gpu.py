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


def test_quick_cpu_run_writes_every_section(tmp_path, capfd):
    out = tmp_path / "bench.md"
    report = bench_gpu.main(["--device", "cpu", "--quick", "--out", str(out)])
    assert out.read_text() == report
    printed = capfd.readouterr()
    assert printed.out.rstrip().endswith(f"written to {out.resolve()}")
    assert "profiler" not in printed.err and "USDT" not in printed.err  # the profiler's native lines
    assert "The unpatched step at 128x128: " in report
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
    catalog = {**bench_dit.ARMS, **bench_dit.EXTRA_ARMS}
    for name, spec in bench_dit.MODELS.items():  # every arm, and its speed-up beside the FLOP bound of the full step
        table = next(table for table in report.split("\n\n") if table.startswith(f"| {spec.title} (tiny"))
        assert "wall s/call" in table and "cpu s/call" not in table
        rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
        assert [row[0] for row in rows] == [catalog[arm][0] for arm in bench_dit.DEFAULT_ARMS[name]]
        assert all(float(row[5]) >= 1 for row in rows)
    assert "goal" not in report  # issue 21's goals are for the CPU


def test_cuda_without_a_gpu_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        bench_gpu.main(["--device", "cuda"])
    assert "no CUDA device is available here" in capsys.readouterr().err


def test_the_unpatched_steps_of_two_tables_are_compared_and_a_drift_is_named():
    agree = bench_gpu.unpatched_agreement(512, [0.30, 0.31, 0.29], [0.32])
    assert agree.endswith("0.300 s in the step table, 0.320 s in the modes table.")
    drift = bench_gpu.unpatched_agreement(512, [9.8], [0.30])
    assert "9.800 s in the step table, 0.300 s in the modes table" in drift
    assert "They differ by 32.7x" in drift and "compare times within a table only" in drift
