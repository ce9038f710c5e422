"""scripts/bench_unet.py at tiny widths: the generation mode's arms, plan counts and table, and the step mode."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.tiny_diffusers import sd15_unet

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_unet  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def test_generation_mode_times_every_arm_and_counts_the_plans_reuse_saves():
    unet = sd15_unet()
    processors = dict(unet.attn_processors)
    table = bench_unet.run_generation(unet, 128, 2, torch.float32, CPU, time.process_time, calls=5, batch=2)
    assert [s.label for s in table] == [
        "unpatched",
        "tomesd ratio=0.6",
        "sdmerge tome r=0.4",
        "sdmerge atc_average r=0.4",
        "sdmerge atc_average r=0.4, share_plans",
        "sdmerge atc_average r=0.4, plan_every=5",
        "sdmerge atc_average r=0.4, share_plans, plan_every=5",
    ]
    # 5 merged blocks x 5 calls; one level: 1 per call; the PNDM steps 981, 961, 961, 941, 921 are
    # steps 0-3 of which only 0 computes with plan_every=5; both: one plan per generation
    assert [s.plans for s in table] == [[0, 0], [25, 25], [25, 25], [25, 25], [5, 5], [5, 5], [1, 1]]
    assert all(len(s.times) == 2 and min(s.times) > 0 for s in table)
    assert all(s.plan_times[0] > 0 for s in table[1:]) and table[0].plan_times == [0.0, 0.0]
    assert all(unet.attn_processors[name] is p for name, p in processors.items())  # unpatched afterwards

    lines = bench_unet.generation_markdown(128, table, "cpu", 5, batch=2).splitlines()
    assert lines[0].startswith("| 128x128, batch 2, 5 calls | median cpu s/generation | vs unpatched (range) ")
    assert len(lines) == 2 + len(table)
    unpatched, tomesd = lines[2].split(" | "), lines[3].split(" | ")
    assert unpatched[2] == "1" and tomesd[3] == "1" and lines[-1].endswith("| 1 |")
    ratios = [atc / reference for atc, reference in zip(table[3].times, table[1].times)]  # paired per repetition
    expected = f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
    assert lines[5].split(" | ")[3] == expected


def test_generation_calls_follow_the_sd15_pndm_schedule():
    assert bench_unet.pndm_timesteps(5) == [981, 961, 961, 941, 921]
    with pytest.raises(ValueError, match="calls=0"):
        bench_unet.pndm_timesteps(0)
    unet, seen = sd15_unet(), []
    unet.register_forward_pre_hook(lambda module, args: seen.append((int(args[1]), args[0].clone())))
    inputs = bench_unet.make_inputs(unet, 128, 1, torch.float32, CPU)
    timer = bench_unet.OverheadTimer(CPU, time.perf_counter)
    with torch.no_grad():
        bench_unet.time_generation(unet, 3, inputs, CPU, timer)
    assert [t for t, _ in seen] == [981, 961, 961]
    assert torch.equal(seen[0][1], inputs[0]) and not torch.equal(seen[1][1], inputs[0])  # the scheduler stepped


def test_step_mode_at_tiny_widths():
    table = bench_unet.run_resolution(sd15_unet(), 128, 1, torch.float32, CPU, methods=("tome",), batch=2)
    assert [s.label for s in table] == [
        "unpatched",
        "tomesd ratio=0.5",
        "sdmerge tome r=0.5",
        "tomesd ratio=0.6",
        "sdmerge tome r=0.4",
    ]
    assert [s.plans for s in table] == [[0], [5], [5], [5], [5]]
    assert len(bench_unet.markdown(128, table, "wall", batch=2).splitlines()) == 2 + len(table)


def test_modes_mode_at_tiny_widths():
    table = bench_unet.run_resolution(sd15_unet(), 128, 1, torch.float32, CPU, batch=2, table=bench_unet.modes_settings())
    labels = [s.label for s in table]
    assert labels[:4] == ["unpatched", "tomesd ratio=0.5", "sdmerge tome r=0.5", "tomesd ratio=0.5, merge_crossattn"]
    assert "sdmerge tome r=0.5, merge_crossattn, merge_mlp" in labels and "sdmerge grid r=0.25, kv_only" in labels
    assert all(s.plans == ([0] if s.library == "none" else [5]) for s in table)  # 5 merged blocks, each arm
    lines = bench_unet.markdown(128, table, "wall", batch=2, reference=bench_unet.REFERENCE).splitlines()
    assert len(lines) == 2 + len(table) and "vs tomesd ratio=0.5 (range)" in lines[0]
    row = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert row["sdmerge tome r=0.5, merge_mlp"][3] != ""  # paired with tomesd's merge_mlp arm
    assert row["sdmerge grid r=0.5, kv_only"][3] == ""  # tomesd has no keys-and-values mode
