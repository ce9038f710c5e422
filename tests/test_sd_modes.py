"""Stable Diffusion merging modes (issue 12): which branches merge (tomesd's merge_attn /
merge_crossattn / merge_mlp), keys and values only (ToDo, proportional attention), the grid
grouping, and the timestep range; alone, combined, and with plan reuse."""

from __future__ import annotations

import itertools

import pytest
import tomesd
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import sdmerge
from sdmerge.core import MergePlan, window_for_keep_rate, window_groups
from sdmerge.methods import METHODS
from sdmerge.diffusion.branches import merged_keys_and_values
from tests import test_plan_reuse
from tests.test_stable_diffusion import Capture, RecordingProcessor, forward, hook_counts
from tests.tiny_diffusers import SD15_MERGED, SD_METHODS, sd15_unet, tiny_pipeline, unet_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNDM = test_plan_reuse.PNDM
spy = test_plan_reuse.spy  # the fixture: spy(unet) records which calls compute plans

BRANCHES = [dict(zip(("merge_attn", "merge_crossattn", "merge_mlp"), on)) for on in itertools.product((True, False), repeat=3)]
BRANCHES = [b for b in BRANCHES if any(b.values())]  # the 7 combinations that merge something


def keep_rate_for(method: str) -> float:
    return 0.25 if METHODS[method].grouping == "grid" else 0.5


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs(batch=2)


# --- where to merge: tomesd's options ------------------------------------------------------------


@pytest.mark.parametrize("branches", BRANCHES, ids=lambda b: "+".join(k[6:] for k, v in b.items() if v))
@pytest.mark.parametrize("keep_rate, max_downsample", [(0.5, 1), (0.3, 2)])
def test_every_branch_combination_equals_tomesd(branches, keep_rate, max_downsample, inputs):
    unet = sd15_unet()
    base = forward(unet, *inputs)
    tomesd.apply_patch(unet, ratio=1 - keep_rate, use_rand=False, max_downsample=max_downsample, **branches)
    expected = forward(unet, *inputs)
    tomesd.remove_patch(unet)
    sdmerge.apply(unet, "tome", r=keep_rate, use_rand=False, max_downsample=max_downsample, **branches)
    got = forward(unet, *inputs)
    sdmerge.remove(unet)
    assert (expected - base).abs().max() > 1e-3  # tomesd did merge
    assert (got - expected).abs().max() <= 1e-5


def test_crossattn_and_mlp_run_on_the_merged_tokens_of_the_self_attention_plan(inputs, spy):
    unet = sd15_unet()
    spy = spy(unet)
    block = unet.get_submodule(SD15_MERGED[0])
    attn1, attn2, ff_tokens = RecordingProcessor(), RecordingProcessor(), []
    block.attn1.set_processor(attn1)
    block.attn2.set_processor(attn2)
    sdmerge.apply(unet, "tome", r=0.5, merge_attn=False, merge_crossattn=True, merge_mlp=True, use_rand=False)
    # inside ff (its first layer): what ff's forward received (sdmerge wraps ff's forward)
    handle = block.ff.net[0].register_forward_pre_hook(lambda m, args: ff_tokens.append(args[0].shape[1]) and None)
    forward(unet, *inputs)
    handle.remove()
    assert attn1.token_counts == [256] and attn2.token_counts == ff_tokens == [128]  # 16x16 latent, r=0.5
    assert len(spy.computed) == len(SD15_MERGED)  # one plan per block, used by both branches
    assert len(spy.used) == 2 * len(SD15_MERGED)


def test_cis_keeps_the_prompt_mass_of_every_token_when_the_crossattention_is_merged(inputs):
    unet = sd15_unet()
    sdmerge.apply(unet, "cis", r=0.5, merge_crossattn=True, use_rand=False)
    forward(unet, *inputs, 900)
    forward(unet, *inputs, 800)  # uses the mass of the first call
    mass = unet._sdmerge.generations.current().masses[SD15_MERGED[0]]
    assert mass.shape == (2, 256)
    # Every token carries its group's mass: as many distinct values as groups at most.
    assert all(len(torch.unique(row)) <= 128 for row in mass)


def test_mlp_merging_refuses_a_chunked_feed_forward(inputs):
    unet = sd15_unet()
    unet.get_submodule(SD15_MERGED[0]).set_chunk_feed_forward(64, dim=1)
    sdmerge.apply(unet, "tome", r=0.5, merge_mlp=True)
    with pytest.raises(ValueError, match="merge_mlp.*disable_forward_chunking"):
        forward(unet, *inputs)


# --- keys and values only: proportional attention ----------------------------------------------------


@pytest.mark.parametrize("processor", [AttnProcessor2_0(), AttnProcessor()], ids=["sdpa", "classic"])
def test_proportional_attention_over_groups_of_identical_tokens_is_the_unmerged_attention(processor):
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    distinct = torch.randn(2, 5, 16)
    labels = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4, 0, 4], [4, 4, 4, 4, 3, 2, 1, 0, 0, 1]])
    tokens = torch.stack([distinct[b, labels[b]] for b in range(2)])  # [2, 10, 16], groups of equal rows
    plan = MergePlan(labels, 5)
    with torch.no_grad():
        unmerged = processor(attn, tokens)
        merged = processor(attn, tokens, **merged_keys_and_values(plan, None, tokens))
        unweighted = processor(attn, tokens, encoder_hidden_states=plan.merge(tokens))
    torch.testing.assert_close(merged, unmerged, atol=1e-6, rtol=1e-5)
    assert (unweighted - unmerged).abs().max() > 1e-3  # without log(size) it would differ


def test_kv_only_grid_is_todo_average_pooling_of_keys_and_values(inputs):
    unet = sd15_unet()
    block = unet.get_submodule(SD15_MERGED[0])
    sdmerge.apply(unet, "grid", r=0.25, kv_only=True)
    with Capture(block) as calls:
        forward(unet, *inputs)
    h, out = calls[0].h, calls[0].out  # attn1's input (all 256 queries) and output
    grid = h.transpose(1, 2).reshape(2, -1, 16, 16)
    pooled = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # ToDo's downsample_method="avg_pool", factor 2
    with torch.no_grad():
        expected = AttnProcessor2_0()(block.attn1, h, encoder_hidden_states=pooled)
    assert out.shape == h.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_grid_kv_only_with_dropped_partial_windows_is_todos_avg_pool_on_any_grid():
    """partial_windows='drop': on a 9x13 latent (a grid the 2x2 window does not tile) the keys and
    values are avg_pool2d's, which drops the last row and column: 4x6 keys, all queries."""
    unet = sd15_unet()
    inputs = unet_inputs(size=(9, 13))
    block = unet.get_submodule(SD15_MERGED[0])
    sdmerge.apply(unet, "grid", r=0.25, kv_only=True, partial_windows="drop")
    with Capture(block) as calls:
        forward(unet, *inputs)
    h, out = calls[0].h, calls[0].out
    pooled = F.avg_pool2d(h.transpose(1, 2).reshape(2, -1, 9, 13), 2).flatten(2).transpose(1, 2)
    assert pooled.shape[1] == 4 * 6
    with torch.no_grad():
        expected = AttnProcessor2_0()(block.attn1, h, encoder_hidden_states=pooled)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    sdmerge.apply(unet, "grid", r=0.25, kv_only=True)  # the default keeps the cut windows: not avg_pool's keys
    with Capture(block) as calls:
        forward(unet, *inputs)
    assert (calls[0].out - expected).abs().max() > 1e-4
    for options in ({}, {"kv_only": True, "merge_mlp": True}):
        with pytest.raises(ValueError, match="partial_windows='drop' .* needs method='grid' with kv_only=True"):
            sdmerge.apply(unet, "grid", r=0.25, partial_windows="drop", **options)
    with pytest.raises(ValueError, match="partial_windows='cut' is not allowed; allowed: 'keep', 'drop'"):
        sdmerge.apply(unet, "grid", r=0.25, kv_only=True, partial_windows="cut")


@pytest.mark.parametrize("method", SD_METHODS)
def test_kv_only_works_with_every_method(method, inputs):
    unet = sd15_unet()
    base = forward(unet, *inputs, 900)
    sdmerge.apply(unet, method, r=keep_rate_for(method), kv_only=True)
    got = [forward(unet, *inputs, t) for t in (900, 800)]  # the second call has a prompt mass
    assert all(torch.isfinite(g).all() for g in got)
    assert (got[0] - base).abs().max() > 1e-4


def test_kv_only_refuses_fused_projections(inputs):
    unet = sd15_unet()
    sdmerge.apply(unet, "tome", r=0.5, kv_only=True)
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="kv_only.*unfuse_qkv_projections"):
        forward(unet, *inputs)


# --- the grid grouping ------------------------------------------------------------------------------------


def test_window_for_keep_rate():
    assert [window_for_keep_rate(r) for r in (1, 1 / 2, 1 / 3, 1 / 4, 1 / 6, 1 / 8, 1 / 9, 0.0625)] == [
        (1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (2, 4), (3, 3), (4, 4),
    ]
    for bad in (0.4, 0.3, 0.7):
        with pytest.raises(ValueError, match="1/n"):
            window_for_keep_rate(bad)


def test_window_groups_cover_edge_windows():
    plan = window_groups(2, 3, 5, 2, 2)  # a 3x5 grid: windows 2x2, cut at the bottom and right edges
    expected = torch.tensor([[0, 0, 1, 1, 2], [0, 0, 1, 1, 2], [3, 3, 4, 4, 5]]).flatten()
    assert plan.num_groups == 6 and torch.equal(plan.labels, expected.expand(2, 15))
    assert plan.counts[0].tolist() == [4, 4, 2, 2, 2, 1]
    assert not plan.equal_groups and window_groups(1, 4, 6, 2, 3).equal_groups  # tiled: all groups equal


def test_equal_groups_leave_out_the_constant_bias_and_give_the_same_attention():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    tokens = torch.randn(2, 16, 16)
    plan = window_groups(2, 4, 4, 2, 2)
    assert set(merged_keys_and_values(plan, None, tokens)) == {"encoder_hidden_states"}
    biased = merged_keys_and_values(MergePlan(plan.labels, plan.num_groups), None, tokens)  # same groups, not told
    assert set(biased) == {"encoder_hidden_states", "attention_mask"}
    with torch.no_grad():
        unbiased = AttnProcessor2_0()(attn, tokens, **merged_keys_and_values(plan, None, tokens))
        torch.testing.assert_close(unbiased, AttnProcessor2_0()(attn, tokens, **biased), atol=1e-6, rtol=1e-5)


def test_grid_merging_in_the_unet_merges_windows(inputs):
    unet = sd15_unet()
    block = unet.get_submodule(SD15_MERGED[0])
    seen = []
    handle = block.attn1.register_forward_pre_hook(lambda m, args: seen.append(args[0]) and None)
    sdmerge.apply(unet, "grid", r=0.5)  # 1x2 windows: horizontal pairs
    with Capture(block) as calls:
        forward(unet, *inputs)
    handle.remove()
    h = calls[0].h
    assert seen[0].shape == (2, 256, 32)  # the Attention module still gets all tokens; its processor merges
    pairs = h.view(2, 128, 2, 32).mean(dim=2)
    with torch.no_grad():
        expected = AttnProcessor2_0()(block.attn1, pairs).repeat_interleave(2, dim=1)
    torch.testing.assert_close(calls[0].out, expected, atol=1e-5, rtol=1e-5)


def test_grid_refuses_keep_rates_that_are_not_one_over_n_and_split_options():
    unet = sd15_unet()
    with pytest.raises(ValueError, match="1/n"):
        sdmerge.apply(unet, "grid", r=0.4)
    with pytest.raises(ValueError, match="sx=3.*does not apply to method 'grid'"):
        sdmerge.apply(unet, "grid", r=0.25, sx=3)


# --- when to merge: the timestep range ----------------------------------------------------------------


def test_calls_outside_the_timestep_range_run_unmerged(inputs):
    unet = sd15_unet()
    base = {t: forward(unet, *inputs, t) for t in (900, 500, 100)}
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False)
    merged = {t: forward(unet, *inputs, t) for t in (900, 500, 100)}
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, timestep_range=(300, 1000))
    got = {t: forward(unet, *inputs, t) for t in (900, 500, 100)}
    assert torch.equal(got[900], merged[900]) and torch.equal(got[500], merged[500])
    assert torch.equal(got[100], base[100])  # below 300: unmerged
    assert not torch.equal(merged[100], base[100])
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, timestep_range=(500, 500))  # one timestep
    assert torch.equal(forward(unet, *inputs, 500), merged[500]) and torch.equal(forward(unet, *inputs, 900), base[900])


def test_a_generation_that_starts_outside_the_range_computes_plans_when_merging_starts(inputs, spy):
    unet = sd15_unet()
    spy = spy(unet)
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False, plan_every=3, timestep_range=(0, 970))
    for t in PNDM:  # 981 is outside the range; 961 (twice), 941, 921, 901, 881 are inside
        forward(unet, *inputs, t)
    # Steps are counted from the first merged call: 961 (calls 1 and 2) is a plan step, then 901 (call 5).
    assert spy.computing_calls() == [1, 2, 5]
    for t in PNDM:  # a second generation: plans are computed again at its first merged call
        forward(unet, *inputs, t)
    assert spy.computing_calls() == [1, 2, 5, 8, 9, 12]


def test_bad_timestep_ranges_are_refused():
    unet = sd15_unet()
    for bad, error, message in [
        ((500, 100), ValueError, "empty or negative"),
        ((-5, 100), ValueError, "empty or negative"),
        ((1, 2, 3), TypeError, "a pair"),
        ("0-500", TypeError, "a pair"),
        ((True, 500), TypeError, "not a timestep"),
        ((0, float("nan")), TypeError, "not a timestep"),
    ]:
        with pytest.raises(error, match=message):
            sdmerge.apply(unet, "tome", timestep_range=bad)
    with pytest.raises(ValueError, match="never merges.*0 .. 999"):
        sdmerge.apply(tiny_pipeline(), "tome", timestep_range=(1000, 2000))
    assert not hasattr(unet, "_sdmerge")


def test_bad_mode_options_are_refused():
    unet = sd15_unet()
    with pytest.raises(ValueError, match="nothing would be merged"):
        sdmerge.apply(unet, "tome", merge_attn=False)
    with pytest.raises(ValueError, match="kv_only=True .* needs merge_attn=True"):
        sdmerge.apply(unet, "tome", kv_only=True, merge_attn=False, merge_mlp=True)
    for name in ("merge_attn", "merge_crossattn", "merge_mlp", "kv_only"):
        with pytest.raises(TypeError, match=f"{name} must be True or False"):
            sdmerge.apply(unet, "tome", **{name: 1})


# --- identity, remove, reuse for every mode ---------------------------------------------------------------

MODES = {
    "crossattn+mlp": dict(merge_crossattn=True, merge_mlp=True),
    "kv_only": dict(kv_only=True),
    "kv_only+mlp": dict(kv_only=True, merge_mlp=True),
    "range": dict(timestep_range=(850, 970)),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["tome", "cis", "atc_average", "grid"])
def test_keep_rate_one_is_bit_identical_and_remove_is_exact(mode, method, inputs):
    unet = sd15_unet()
    processors, hooks = dict(unet.attn_processors), hook_counts(unet)
    base = [forward(unet, *inputs, t) for t in (900, 800)]
    sdmerge.apply(unet, method, r=1.0, **MODES[mode])
    assert all(torch.equal(a, forward(unet, *inputs, t)) for a, t in zip(base, (900, 800)))
    sdmerge.apply(unet, method, r=keep_rate_for(method), **MODES[mode])
    merged = forward(unet, *inputs, 900)
    sdmerge.remove(unet)
    assert not torch.equal(merged, base[0])
    assert all(unet.attn_processors[name] is p for name, p in processors.items())
    assert hook_counts(unet) == hooks
    assert torch.equal(forward(unet, *inputs, 900), base[0])


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reuses_plans(mode, inputs, spy):
    unet = sd15_unet()
    spy = spy(unet)
    sdmerge.apply(unet, "tome", r=0.5, seed=0, share_plans=True, plan_every=2, **MODES[mode])
    outputs = [forward(unet, *inputs, t) for t in PNDM[:4]]  # 981, 961, 961, 941
    # One plan per level (share_plans) at the plan steps: 981 (call 0) and 941 (call 3); with the
    # range (850, 970) the steps count from 961 (calls 1 and 2, its two slots), and 941 reuses.
    expected = [1, 2] if mode == "range" else [0, 3]
    assert spy.computing_calls() == expected
    assert all(len(spy.names(c)) == 1 for c in spy.computing_calls())
    assert all(torch.isfinite(o).all() for o in outputs)
