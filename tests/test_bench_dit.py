"""scripts/dit_flops.py (the FLOP bound) by hand and against issues 21 and 22's figures; scripts/bench_dit.py
end to end at tiny widths (``--quick``), its scaling to a full step, and its raw results re-rendered."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench_dit  # noqa: E402
import dit_flops  # noqa: E402
from dit_flops import BranchTokens  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sd3_block_flops_by_hand():
    # N=4 image tokens, T=2 prompt tokens, C=2, MLP 2 -> 8 -> 2; a [m, k] @ [k, n] product is 2mkn
    # image: q, out 2 * (2*4*2*2) = 64; k, v 64; ff 2*4*2*8 + 2*4*8*2 = 256            -> 384
    # prompt: add_q/k/v 3 * (2*2*2*2) = 48; to_add_out 16; ff_context 64 + 64           -> 192
    # joint attention, 6 queries x 6 keys: Q K^T 2*6*2*6 = 144, A V 144                  -> 288
    unmerged = BranchTokens.unmerged(4)
    assert dit_flops.sd3_block(unmerged, text=2, width=2) == 384 + 192 + 288
    assert dit_flops.sd3_block(unmerged, text=2, width=2, context_pre_only=True) == 384 + 48 + 288
    # tome r=0.5 with merge_mlp: every image part on M=2 tokens: 192 + 192 + (2*4*2*4 * 2 = 128)
    merged = dit_flops.branch_tokens(4, 0.5, {"merge_mlp": True})
    assert merged == BranchTokens(queries=2, keys=2, cross=4, mlp=2)
    assert dit_flops.sd3_block(merged, text=2, width=2) == 192 + 192 + 128


def test_pixart_block_flops_by_hand():
    # self-attention: q, out 64; k, v 64; attention 4x4: 64 + 64                        -> 256
    # cross-attention: q, out 64; k, v of the prompt 2 * (2*2*2*2) = 32; 4x2: 32 + 32    -> 160
    # ff 256
    assert dit_flops.pixart_block(BranchTokens.unmerged(4), text=2, width=2) == 256 + 160 + 256
    # grid r=0.25 kv_only: all 4 queries, 1 pooled key/value token, pooled before k and v:
    # q, out 64; k, v 2 * (2*1*2*2) = 16; attention 4x1: 16 + 16                         -> 112
    kv = dit_flops.branch_tokens(4, 0.25, {"kv_only": True})
    assert kv == BranchTokens(queries=4, keys=1, cross=4, mlp=4)
    assert dit_flops.pixart_block(kv, text=2, width=2) == 112 + 160 + 256


def test_flux_single_stream_block_flops_by_hand():
    # N=4 image tokens after T=2 prompt tokens, C=2, MLP 2 -> 8; proj_out 2 + 8 -> 2
    # to_q 2*6*2*2 = 48; to_k, to_v 96; proj_mlp 2*6*2*8 = 192; attention 6x6: 144 + 144; proj_out 2*6*10*2 = 240
    assert dit_flops.flux_single_block(BranchTokens.unmerged(4), text=2, width=2) == 48 + 96 + 192 + 288 + 240
    # tome r=0.5 with merge_mlp: the whole body on T + M = 4 tokens: 32 + 64 + 128 + 128 + 160
    merged = dit_flops.branch_tokens(4, 0.5, {"merge_mlp": True})
    assert dit_flops.flux_single_block(merged, text=2, width=2) == 32 + 64 + 128 + 128 + 160
    # the attention alone merged: proj_mlp and proj_out on all T + N = 6 tokens
    attention_only = dit_flops.branch_tokens(4, 0.5)
    assert dit_flops.flux_single_block(attention_only, text=2, width=2) == 32 + 64 + 192 + 128 + 240


def test_flux_dev_bounds_match_the_issue():
    shape = bench_dit.MODELS["flux"].shape()
    assert (shape.depth, shape.single_from, shape.width, shape.text_tokens, shape.out_channels) == (57, 19, 3072, 512, 64)
    unmerged = BranchTokens.unmerged(4096)
    assert dit_flops.block_flops(shape, unmerged, 18) == dit_flops.sd3_block(unmerged, 512, 3072)  # a double block
    assert dit_flops.block_flops(shape, unmerged, 19) == dit_flops.flux_single_block(unmerged, 512, 3072)
    for index in (1, 30):  # one merged block, double- or single-stream, at 1024x1024: the issue's 1.98x and 1.29x
        for keep_rate, options, bound in ((0.5, {"merge_mlp": True}, 1.98), (0.25, {"kv_only": True}, 1.29)):
            merged = dit_flops.branch_tokens(4096, keep_rate, options)
            ratio = dit_flops.block_flops(shape, unmerged, index) / dit_flops.block_flops(shape, merged, index)
            assert ratio == pytest.approx(bound, abs=0.01)
    # the full 57-block step, first and last blocks unmerged: the goals (1.6x, 1.2x) fit below it
    assert dit_flops.flop_bound(shape, 4096, 0.5, {"merge_mlp": True}) == pytest.approx(1.91, abs=0.01)
    assert dit_flops.flop_bound(shape, 4096, 0.25, {"kv_only": True}) == pytest.approx(1.27, abs=0.01)


def test_step_flops_are_the_blocks_and_the_rest():
    shape = bench_dit.MODELS["sd3"].shape()
    assert (shape.depth, shape.width, shape.text_tokens, shape.text_width) == (24, 1536, 333, 4096)
    unmerged, merged = BranchTokens.unmerged(4096), dit_flops.branch_tokens(4096, 0.5)
    middle, last = dit_flops.block_flops(shape, unmerged, 1), dit_flops.block_flops(shape, unmerged, 23)
    assert last < middle  # the last block is context_pre_only
    outside = dit_flops.outside_blocks(shape, 4096)
    assert dit_flops.step_flops(shape, 4096, unmerged, ()) == outside + 23 * middle + last
    patched = outside + 22 * dit_flops.block_flops(shape, merged, 1) + middle + last
    assert dit_flops.flop_bound(shape, 4096, 0.5) == pytest.approx((outside + 23 * middle + last) / patched)
    assert dit_flops.flop_bound(shape, 4096, None) == 1


def test_sd3_medium_block_bounds_match_the_issue():
    shape = bench_dit.MODELS["sd3"].shape()  # one merged block at 1024x1024: 4096 image tokens
    assert dit_flops.block_bound(shape, 4096, 0.5, {"merge_mlp": True}) == pytest.approx(2.19, abs=0.01)
    assert dit_flops.block_bound(shape, 4096, 0.25, {"kv_only": True}) == pytest.approx(1.44, abs=0.01)
    assert dit_flops.block_bound(shape, 4096, 0.5) == pytest.approx(1.50, abs=0.01)
    # the full 24-block step, first and last blocks unmerged: less, and the goals fit below it
    assert dit_flops.flop_bound(shape, 4096, 0.5, {"merge_mlp": True}) == pytest.approx(1.99, abs=0.01)
    assert dit_flops.flop_bound(shape, 4096, 0.25, {"kv_only": True}) == pytest.approx(1.39, abs=0.01)
    assert dit_flops.flop_bound(shape, 4096, 0.5) == pytest.approx(1.44, abs=0.01)


def _run(blocks, plans, seconds=10.0, calls=1, stacks=None):
    return bench_dit.Run(calls, np.array([seconds, seconds]), np.array(blocks, float)[:, None].repeat(2, 1),
                         np.array(plans, float)[:, None].repeat(2, 1), np.zeros(2), np.zeros(2), 1, stacks)


def test_scaling_to_a_full_step():
    run = _run([1, 2, 2, 1], [0, 0.5, 0, 0])  # outside the blocks: 10 - 6 = 4
    # 24 blocks: 4 + 1 + 1 + 22/2 * (3.5 of work) + plans: 22/2 * 0.5 per block, or 0.5 once if shared
    assert run.scaled_step(24, shares_plans=False)[bench_dit.CPU] == pytest.approx(4 + 2 + 38.5 + 5.5)
    assert run.scaled_step(24, shares_plans=True)[bench_dit.WALL] == pytest.approx(4 + 2 + 38.5 + 0.5)
    assert run.scaled_step(4, shares_plans=False)[bench_dit.CPU] == pytest.approx(10)  # the measured depth
    assert _run([1, 2, 2, 1], [0, 0, 0, 0], seconds=20, calls=2).scaled_step(4, False)[bench_dit.CPU] == 10


def test_scaling_two_stacks_to_a_full_step():
    # Flux measured with 2 double- and 2 single-stream blocks: the first double and the last single
    # block unmerged; the other double block stands for 18, the other single block for 37
    run = _run([1, 2, 3, 1], [0, 0.5, 0, 0], stacks=[2, 2])  # outside the blocks: 10 - 7 = 3
    assert run.scaled_step((19, 38), shares_plans=False)[bench_dit.CPU] == pytest.approx(3 + 2 + 18 * 1.5 + 37 * 3 + 18 * 0.5)
    assert run.scaled_step((19, 38), shares_plans=True)[bench_dit.CPU] == pytest.approx(3 + 2 + 18 * 1.5 + 37 * 3 + 0.5)
    assert run.scaled_step((2, 2), shares_plans=False)[bench_dit.WALL] == pytest.approx(10)  # the measured depth
    assert bench_dit.MODELS["flux"].split(4) == (2, 2) and bench_dit.MODELS["flux"].split(5) == (3, 2)


def _rows(report: str, title: str) -> dict[str, list[str]]:
    table = next(block for block in report.split("\n\n") if block.startswith(f"| {title}"))
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:])}


def test_quick_run_end_to_end(tmp_path, capsys):
    out = tmp_path / "dit.md"
    report = bench_dit.main(["--quick", "--out", str(out)])
    assert out.read_text() == report and "float32, random weights" in report
    labels = [label for label, *_ in bench_dit.ARMS.values()]
    catalog = {**bench_dit.ARMS, **bench_dit.EXTRA_ARMS}
    for name, batch, depth in (("sd3", 2, 24), ("pixart", 2, 28), ("flux", 1, 57)):
        spec = bench_dit.MODELS[name]
        speeds = _rows(report, f"{spec.title} (tiny widths) 128x128, batch {batch}, 4 of {depth} blocks, 5 calls")
        assert list(speeds) == [catalog[arm][0] for arm in bench_dit.DEFAULT_ARMS[name]]
        assert speeds["unpatched"][2] == "1.000 (1.000-1.000)"  # speed-up, 4 blocks, cpu
        assert float(speeds["tome r=0.5, merge_mlp"][7]) > float(speeds["tome r=0.5"][7]) > 1  # FLOP bound, full step
    parts = _rows(report, "parts, cpu s/call")  # the first parts table: SD3's
    # plans per call: each of the 2 merged blocks plans; atc with share_plans and plan_every=5: one in 5 calls
    assert [parts[label][6] for label in labels] == ["0", "2", "2", "2", "0.2"]
    flux = _rows(report[report.index("FLUX.1-dev: 2 + 2 of 19 + 38 blocks"):], "parts, cpu s/call")
    # pyramid attention broadcast replays the attention in 2 of 5 calls: tome's feed-forward still
    # plans in both merged blocks in every call; grid kv_only (nothing after the attention) plans only
    # in the 3 calls that run the attention, in both blocks: 6 plans
    assert flux["PAB + tome r=0.5, merge_mlp"][6] == "2" and flux["PAB + grid r=0.25, kv_only"][6] == "1.2"
    # TaylorSeer lite skips every block in 2 of 5 calls: both merged arms plan in the other 3
    assert flux["TaylorSeer lite + tome r=0.5, merge_mlp"][6] == flux["TaylorSeer lite + grid r=0.25, kv_only"][6] == "1.2"
    assert "goal" not in report  # the goals are for 1024x1024
    saved = json.loads(Path(f"{out}.json").read_text())
    assert [(r["model"], r["side"]) for r in saved["results"]] == [("sd3", 128), ("pixart", 128), ("flux", 128)]
    assert bench_dit.main(["--render", f"{out}.json"]) == report  # the tables again, from the raw times


def test_goal_lines_say_met_or_missed():
    table = bench_dit.arms()
    for arm, seconds in zip(table, (20.0, 15.0, 10.0, 16.0, 16.0)):
        arm.runs = [_run([1, 1, 1, 1], [0, 0, 0, 0], seconds=seconds) for _ in range(2)]
    lines = bench_dit.goal_lines("sd3", 1024, table, ("cpu",))
    # every middle and end block takes 1 s, so the 24-block step is 20 - 4 + 24 = 40 s unpatched
    assert lines == [
        "- goal tome r=0.5, merge_mlp >= 1.75x per 24-block step: cpu 1.333x: MISSED",
        "- goal grid r=0.25, kv_only >= 1.3x per 24-block step: cpu 1.111x: MISSED",
        "- goal atc_average r=0.5, share_plans, plan_every=5 >= 1.35x per 24-block step: cpu 1.111x: MISSED",
    ]
    assert bench_dit.goal_lines("sd3", 512, table) == []


def test_flux_goals_and_caches_multiplying():
    table = bench_dit.arms(bench_dit.DEFAULT_ARMS["flux"])
    assert [arm.label for arm in table][-6:] == [
        "PAB", "PAB + tome r=0.5, merge_mlp", "PAB + grid r=0.25, kv_only",
        "TaylorSeer lite", "TaylorSeer lite + tome r=0.5, merge_mlp", "TaylorSeer lite + grid r=0.25, kv_only",
    ]
    # no time in the blocks: a full step takes the measured seconds
    seconds = {"unpatched": 20, "tome r=0.5, merge_mlp": 10, "grid r=0.25, kv_only": 16, "PAB": 16,
               "PAB + tome r=0.5, merge_mlp": 8, "PAB + grid r=0.25, kv_only": 11, "TaylorSeer lite": 12,
               "TaylorSeer lite + tome r=0.5, merge_mlp": 6, "TaylorSeer lite + grid r=0.25, kv_only": 10}
    for arm in table:
        arm.runs = [_run([0, 0, 0, 0], [0, 0, 0, 0], seconds=seconds.get(arm.label, 15), stacks=[2, 2])]
    assert bench_dit.goal_lines("flux", 1024, table, ("cpu",)) == [
        "- goal tome r=0.5, merge_mlp >= 1.6x per 57-block step: cpu 2.000x: met",
        "- goal grid r=0.25, kv_only >= 1.2x per 57-block step: cpu 1.250x: met",
        "- goal PAB + tome r=0.5, merge_mlp: PAB x tome r=0.5, merge_mlp within 10%: cpu 2.500x vs 2.500x (1.000): met",
        "- goal PAB + grid r=0.25, kv_only: PAB x grid r=0.25, kv_only within 10%: cpu 1.818x vs 1.562x (1.164): MISSED",
        "- goal TaylorSeer lite + tome r=0.5, merge_mlp: TaylorSeer lite x tome r=0.5, merge_mlp within 10%: "
        "cpu 3.333x vs 3.333x (1.000): met",
        "- goal TaylorSeer lite + grid r=0.25, kv_only: TaylorSeer lite x grid r=0.25, kv_only within 10%: "
        "cpu 2.000x vs 2.083x (0.960): met",
    ]


def test_help_works(capsys):
    with pytest.raises(SystemExit) as exit:
        bench_dit.main(["--help"])
    assert exit.value.code == 0 and "--blocks-at-real-width" in capsys.readouterr().out


def test_chosen_arms_and_plans_shared_by_the_blocks():
    report = bench_dit.main(["--quick", "--models", "sd3", "--arms", "tome_mlp_shared"])
    parts = _rows(report, "parts, cpu s/call")
    assert list(parts) == ["unpatched", "tome r=0.5, merge_mlp, share_plans"]  # unpatched always, first
    # one plan per call whatever the depth: the same plan seconds at 4 and at 24 blocks
    assert parts["tome r=0.5, merge_mlp, share_plans"][6] == "1"
    assert parts["tome r=0.5, merge_mlp, share_plans"][7] == parts["tome r=0.5, merge_mlp, share_plans"][8]


def test_the_command_prints_the_issue_s_sd3_bounds_from_a_config_file(tmp_path, capsys):
    """``dit_flops.py CONFIG``: SD3-Medium's config at 1024x1024, one merged block: about 2.19x for
    tome r=0.5 with merge_mlp, 1.44x for grid r=0.25 kv_only, 1.50x self-attention only (issue 21)."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(bench_dit.MODELS["sd3"].model_config(None, False)))
    dit_flops.main([str(config), "--family", "sd3", "--text-tokens", "333", "--sides", "1024"])
    lines = {line.split("  ")[1].strip(): line for line in capsys.readouterr().out.splitlines()}
    assert "one block 2.189x" in lines["tome r=0.5, merge_mlp"]
    assert "one block 1.435x" in lines["grid r=0.25, kv_only"]
    assert "one block 1.503x" in lines["tome r=0.5"]
