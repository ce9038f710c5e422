"""Flux: double- and single-stream blocks, merged tokens at their mean rotary position, caches."""

from __future__ import annotations

import math

import pytest
import torch

import sdmerge
from sdmerge.core.plan import MergePlan
from sdmerge.diffusion import merged_blocks
from sdmerge.diffusion.call import CallState
from sdmerge.diffusion.layout import AttentionTokens
from sdmerge.diffusion.models.flux import _merged_rotation, attention_on_merged_tokens, token_grid
from tests.tiny_diffusers import SD_METHODS
from tests.tiny_dit import (
    T5_TOKENS, flux_inputs, flux_transformer, run, seeded, tiny_flux_img2img_pipeline, tiny_flux_pipeline,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ALL = range(5)  # the tiny model's 2 double- and 3 single-stream blocks
MODES = {
    "attn": {},
    "attn+mlp": {"merge_mlp": True},  # single-stream blocks: the whole body runs merged
    "mlp-only": {"merge_attn": False, "merge_mlp": True},
    "kv_only": {"kv_only": True},
    "kv_only+mlp": {"kv_only": True, "merge_mlp": True},
    "prop_attn+mlp": {"prop_attn": True, "merge_mlp": True},
}


def model():
    return flux_transformer(num_layers=2, num_single_layers=3)


@pytest.mark.parametrize("mode", list(MODES))
def test_every_method_and_mode_runs_changes_the_output_and_remove_is_exact(mode):
    transformer, inputs = model(), flux_inputs()
    base = [run(transformer, inputs, t) for t in (0.9, 0.8)]
    for method in SD_METHODS:
        sdmerge.apply(transformer, method, r=0.25 if method == "grid" else 0.5, blocks=ALL, **seeded(method, **MODES[mode]))
        outs = [run(transformer, inputs, t) for t in (0.9, 0.8)]
        for out, expected in zip(outs, base):
            assert out.shape == expected.shape and torch.isfinite(out).all(), method
            assert not torch.equal(out, expected), method
        sdmerge.apply(transformer, method, r=1.0, blocks=ALL, **seeded(method, **MODES[mode]))
        assert all(torch.equal(run(transformer, inputs, t), b) for t, b in zip((0.9, 0.8), base)), method
    sdmerge.remove(transformer)
    assert not any("forward" in module.__dict__ for module in transformer.modules())
    assert all(torch.equal(run(transformer, inputs, t), b) for t, b in zip((0.9, 0.8), base))


def test_blocks_index_the_double_then_the_single_stream_blocks():
    transformer = model()
    sdmerge.apply(transformer, "tome", r=0.5)
    assert merged_blocks(transformer) == (
        "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1",
    )
    sdmerge.apply(transformer, "tome", r=0.5, blocks=[0, 4])
    assert merged_blocks(transformer) == ("transformer_blocks.0", "single_transformer_blocks.2")
    with pytest.raises(ValueError, match=r"max_downsample=1 chooses UNet blocks.*Flux"):
        sdmerge.apply(transformer, "tome", max_downsample=1)


# --- positions -------------------------------------------------------------------------------------------


def test_a_merged_token_is_rotated_by_its_groups_mean_position():
    """Hand-built: tokens at (0, 0, 0), (0, 0, 2) and (0, 3, 1) merged into one group (with weights
    1, 1, 2): its rotation is FluxPosEmbed's at the weighted mean id (0, 1.5, 1), whose angle in every
    channel pair is the weighted mean of the tokens' angles (rotary angles are linear in the ids),
    and a rotation (cos^2 + sin^2 = 1), not the mean of the tokens' cos and sin."""
    transformer = model()
    ids = torch.tensor([[0.0, 0, 0], [0, 0, 2], [0, 3, 1], [0, 1, 1]])
    plan = MergePlan(torch.tensor([[0, 0, 0, 1]]), 2)
    weights = torch.tensor([[1.0, 1.0, 2.0, 1.0]])
    call = CallState(None, False, True, positions=(torch.zeros(1, 3), ids))
    tokens = AttentionTokens(None, None, None, None, plan, weights, True, call)
    cos, sin = _merged_rotation(transformer.pos_embed, tokens)
    expected_cos, expected_sin = transformer.pos_embed(torch.tensor([[0.0, 1.5, 1.0], [0, 1, 1]]))
    torch.testing.assert_close(cos[0], expected_cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin[0], expected_sin, atol=1e-6, rtol=0)
    torch.testing.assert_close(cos.square() + sin.square(), torch.ones_like(cos), atol=1e-6, rtol=0)
    each_cos, each_sin = transformer.pos_embed(ids[:3])
    angle = torch.atan2(sin[0, 0], cos[0, 0])  # the merged token's angles from those of its tokens, linearly:
    half = torch.atan2(*reversed(transformer.pos_embed(torch.tensor([[0.0, 0.5, 0.0], [0, 0, 0.5]]))))  # per half id
    expected_angle = 1.5 * 2 * half[0] + 1.0 * 2 * half[1]  # row 1.5, column 1 (angles below pi here: no wrap)
    torch.testing.assert_close(angle, expected_angle, atol=1e-5, rtol=0)
    averaged = each_cos[:3].mean(dim=0).square() + each_sin[:3].mean(dim=0).square()
    assert (averaged < 1 - 1e-3).any()  # averaging cos and sin would not have been a rotation


def test_token_grid_comes_from_the_image_ids_and_is_kept_on_them():
    inputs = flux_inputs(height=12, width=20)  # a 6x10 token grid
    assert token_grid((), inputs) == (6, 10)
    assert inputs["img_ids"]._sdmerge_grid == (6, 10)
    shuffled = inputs["img_ids"][torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    assert token_grid((), {"img_ids": shuffled}) is None  # not in raster order: no grid
    kontext = torch.cat([inputs["img_ids"], inputs["img_ids"] + torch.tensor([1.0, 0, 0])])
    assert token_grid((), {"img_ids": kontext}) is None  # a reference image's tokens after the target's


# --- the merged attention is diffusers' attention ----------------------------------------------------------


@pytest.mark.parametrize("stream", ["double", "single"])
def test_the_merged_attention_with_every_token_its_own_group_is_diffusers_attention(stream):
    transformer = model()
    inputs = flux_inputs()
    block = transformer.transformer_blocks[0] if stream == "double" else transformer.single_transformer_blocks[0]
    image = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(3))
    text = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(4))
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]])
    rotary = transformer.pos_embed(ids)
    plan = MergePlan(torch.arange(64).expand(2, -1).contiguous(), 64)
    call = CallState(None, False, True, positions=(inputs["txt_ids"], inputs["img_ids"]))
    tokens = AttentionTokens(image, image, text, None, plan, None, True, call)
    with torch.no_grad():
        if stream == "double":
            expected = block.attn(hidden_states=image, encoder_hidden_states=text, image_rotary_emb=rotary)
            got = attention_on_merged_tokens(transformer.pos_embed, block.attn, (), {"image_rotary_emb": rotary}, tokens)
            pairs = list(zip(got, expected))
        else:
            expected = block.attn(hidden_states=torch.cat([text, image], dim=1), image_rotary_emb=rotary)
            got = attention_on_merged_tokens(transformer.pos_embed, block.attn, (), {"image_rotary_emb": rotary}, tokens)
            pairs = [(got, expected)]
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def duplicated_inputs():
    """Flux inputs whose image tokens come in pairs identical in features and position (ids)."""
    inputs = flux_inputs(height=8, width=8)  # 16 tokens
    half = torch.arange(16) // 2
    inputs["hidden_states"] = inputs["hidden_states"][:, half]
    inputs["img_ids"] = inputs["img_ids"][half].clone()
    return inputs


@pytest.mark.parametrize("options", [{"prop_attn": True, "merge_mlp": True}, {"prop_attn": True}, {"kv_only": True}],
                         ids=["merged-body", "attention", "kv_only"])
def test_identical_tokens_merged_give_the_unmerged_output(options):
    """Pairs of identical tokens at one position, merged by ATC at r=0.5 in every block (a double-
    and single-stream block's merged attention with proportional attention, the single-stream
    body merged after the norm and unmerged before the residual): the output of the unmerged
    model, to float round-off."""
    transformer, inputs = model(), duplicated_inputs()
    expected = run(transformer, inputs)
    sdmerge.apply(transformer, "atc_average", r=0.5, blocks=ALL, **options)
    torch.testing.assert_close(run(transformer, inputs), expected, atol=2e-5, rtol=1e-5)
    sdmerge.apply(transformer, "atc_average", r=0.5, blocks=ALL, merge_mlp=True)  # without proportional attention
    assert (run(transformer, inputs) - expected).abs().max() > 1e-4


# --- pipelines, reuse, timesteps, compile ------------------------------------------------------------------


def flux_call(pipe, steps: int = 2):
    return pipe("a red cat", height=32, width=32, num_inference_steps=steps, max_sequence_length=T5_TOKENS,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("method", SD_METHODS)
def test_pipeline_merges_repeats_itself_and_remove_is_exact(method):
    pipe = tiny_flux_pipeline(transformer=model())
    pipe.set_progress_bar_config(disable=True)
    base = flux_call(pipe)
    sdmerge.apply(pipe, method, r=0.25 if method == "grid" else 0.5, **seeded(method, blocks=ALL, merge_mlp=True))
    merged = flux_call(pipe)
    assert torch.isfinite(merged).all() and not torch.equal(merged, base)
    assert torch.equal(flux_call(pipe), merged)
    img2img = tiny_flux_img2img_pipeline(pipe)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = img2img("a cat", image=image, strength=0.6, num_inference_steps=4, max_sequence_length=T5_TOKENS,
                  output_type="pt").images
    assert torch.isfinite(out).all()
    sdmerge.remove(pipe)
    assert torch.equal(flux_call(pipe), base)


def test_plan_reuse_and_timestep_range_in_flux_units():
    """Flux's transformer receives timesteps in [0, 1]: timestep_range is in the scheduler's units (x 1000)."""
    transformer, inputs = model(), flux_inputs(batch=1)
    base = {t: run(transformer, inputs, t) for t in (0.9, 0.4)}
    sdmerge.apply(transformer, "tome", r=0.5, seed=1, blocks=ALL, timestep_range=(500, 1000))
    assert not torch.equal(run(transformer, inputs, 0.9), base[0.9])
    assert torch.equal(run(transformer, inputs, 0.4), base[0.4])
    from sdmerge.diffusion import MergedBlock

    computed = []
    original = MergedBlock._new_plan
    MergedBlock._new_plan = lambda self, *a: computed.append(self.name) or original(self, *a)
    try:
        sdmerge.apply(transformer, "atc_average", r=0.5, blocks=ALL, share_plans=True, plan_every=2)
        for t in (0.9, 0.8, 0.7):
            run(transformer, inputs, t)
    finally:
        MergedBlock._new_plan = original
    assert computed == ["transformer_blocks.0", "transformer_blocks.0"]  # steps 0 and 2, one plan per call


@pytest.mark.parametrize("method, options", [("tome", {"seed": 0}), ("grid", {"kv_only": True}),
                                             ("grid", {"merge_mlp": True}), ("atc_average", {"merge_mlp": True})])
def test_fullgraph_compile_equals_eager(method, options):
    """The token grid is read from img_ids on the host once per ids tensor: a first eager call (or a
    pipeline) keeps it on the ids, after which the whole model compiles into one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    transformer, inputs = model(), flux_inputs()
    sdmerge.apply(transformer, method, r=0.25 if method == "grid" else 0.5, blocks=ALL, **options)
    eager = [run(transformer, inputs, t) for t in (0.9, 0.8, 0.7)]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(transformer, backend=counter, fullgraph=True)
    frames = []
    for t, expected in zip((0.9, 0.8, 0.7), eager):
        assert torch.equal(run(compiled, inputs, t), expected)
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[2]
    torch._dynamo.reset()


def test_set_attention_backend_keeps_working():
    transformer, inputs = model(), flux_inputs()
    sdmerge.apply(transformer, "tome", r=0.5, seed=0, blocks=ALL, merge_mlp=True)
    expected = run(transformer, inputs)
    transformer.set_attention_backend("native")
    assert torch.equal(run(transformer, inputs), expected)


def test_flux2_is_refused_with_a_reason():
    from diffusers import Flux2Transformer2DModel

    tiny = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
    )
    with pytest.raises(TypeError, match=r"FLUX.2 \(Flux2Transformer2DModel\) is not supported"):
        sdmerge.apply(tiny, "tome")


# --- diffusers' caches --------------------------------------------------------------------------------------


def cache_configs(pipe):
    """Caches whose skipping does not depend on the (random) weights: pyramid attention broadcast's
    skip ranges and TaylorSeer's cache interval (on the attention modules, and in its lite mode on
    whole blocks and the output projection); first-block cache and MagCache with thresholds no
    error reaches (they skip every call they may: after the first, and after MagCache's retained
    steps up to its longest run of skips)."""
    from diffusers import (
        FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig,
    )
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    return {
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
        "taylorseer_lite": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True),
        "first_block": FirstBlockCacheConfig(threshold=1e9),
        "mag": MagCacheConfig(threshold=1e9, max_skip_steps=2, retention_ratio=0.25, num_inference_steps=4,
                              mag_ratios=FLUX_MAG_RATIOS),
    }


@pytest.mark.parametrize("cache", ["pab", "taylorseer", "taylorseer_lite", "first_block", "mag"])
def test_caches_compose_with_merging_in_either_order_and_each_removes_alone(cache):
    """sdmerge's wrappers sit inside diffusers' hooks on the same modules, whichever came first: the
    two orders give one result, different from either alone; sdmerge.remove leaves the cache, and
    disable_cache leaves the merging (each compared with a fresh pipeline running it alone)."""

    def fresh():
        pipe = tiny_flux_pipeline(transformer=model())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def with_cache(pipe):
        pipe.transformer.enable_cache(cache_configs(pipe)[cache])

    def with_merging(pipe):
        sdmerge.apply(pipe, "tome", r=0.5, seed=0, blocks=ALL, merge_mlp=True)

    outputs = {}
    for name, steps in {
        "plain": (), "cache": (with_cache,), "merging": (with_merging,),
        "merging, then cache": (with_merging, with_cache), "cache, then merging": (with_cache, with_merging),
    }.items():
        pipe = fresh()
        for step in steps:
            step(pipe)
        outputs[name] = flux_call(pipe, steps=4)
    assert all(torch.isfinite(out).all() for out in outputs.values())
    assert torch.equal(outputs["merging, then cache"], outputs["cache, then merging"])
    for alone in ("plain", "cache", "merging"):
        assert not torch.equal(outputs["cache, then merging"], outputs[alone]), alone

    for first, second in ((with_merging, with_cache), (with_cache, with_merging)):
        pipe = fresh()
        first(pipe), second(pipe)
        sdmerge.remove(pipe)
        assert torch.equal(flux_call(pipe, steps=4), outputs["cache"])
        pipe = fresh()
        first(pipe), second(pipe)
        pipe.transformer.disable_cache()
        assert torch.equal(flux_call(pipe, steps=4), outputs["merging"])


def test_under_a_cache_a_single_stream_body_hands_every_token_on():
    """A cache keeps what a hooked module returns and replays it in later calls, whose plans group
    other tokens: so what a diffusers hook around a single-stream block's attention or MLP sees is
    every token, T + N, not the merged body's T + M. A hooked attention unmerges inside the hook
    and its output is merged again outside it, the body going on merged (the MLP sees T + M); a
    hooked MLP makes each module merge and unmerge on its own. Both compute the same output."""
    from diffusers.hooks import HookRegistry, ModelHook

    transformer, inputs = model(), flux_inputs()  # 12 prompt tokens, 64 image tokens
    seen = {"attn": [], "proj_mlp": []}  # torch hooks registered first: they see what a cache's hook returns
    for block in transformer.single_transformer_blocks:
        for name in seen:
            getattr(block, name).register_forward_hook(lambda module, args, output, name=name: seen[name].append(output.shape[1]))
    plain = run(transformer, inputs)
    sdmerge.apply(transformer, "tome", r=0.5, seed=0, blocks=ALL, merge_mlp=True)

    def merged_run():
        for shapes in seen.values():
            shapes.clear()
        return run(transformer, inputs)

    merged_body = merged_run()
    assert seen == {"attn": [12 + 32] * 3, "proj_mlp": [12 + 32] * 3}  # every block's body runs merged

    def hook_each(name):  # a hook that changes nothing, where caches sit
        for block in transformer.single_transformer_blocks:
            HookRegistry.check_if_exists_or_initialize(getattr(block, name)).register_hook(ModelHook(), "passing")

    hook_each("attn")
    attention_cached = merged_run()
    assert seen == {"attn": [12 + 64] * 3, "proj_mlp": [12 + 32] * 3}
    hook_each("proj_mlp")
    both_cached = merged_run()
    assert seen == {"attn": [12 + 64] * 3, "proj_mlp": [12 + 64] * 3}
    for cached in (attention_cached, both_cached):
        torch.testing.assert_close(cached, merged_body, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(merged_body, plain, atol=1e-3)


@pytest.mark.parametrize(("method", "ff_tokens"), [("tome", [32, 32]), ("cis", [32, 64])])
def test_a_block_whose_attention_a_cache_replays_still_merges_its_feed_forward(method, ff_tokens):
    """Pyramid attention broadcast replays the attention's output in every second call: the plan,
    usually made in the attention, is then made for the feed-forward from the block's input
    (``tome``); ``cis`` weights by this call's attention inputs, which it does not have: its
    feed-forward runs unmerged in that call."""
    from diffusers import PyramidAttentionBroadcastConfig

    transformer, inputs = model(), flux_inputs()  # 64 image tokens
    transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500,
    ))
    sdmerge.apply(transformer, method, r=0.5, seed=0, blocks=ALL, merge_mlp=True)
    seen = []
    transformer.transformer_blocks[0].ff.net[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    outputs = [run(transformer, inputs, t) for t in (0.9, 0.8)]  # the second call replays every attention
    assert seen == ff_tokens
    assert all(torch.isfinite(out).all() for out in outputs)


@pytest.mark.parametrize("method, options", [("tome", {"seed": 0}), ("grid", {"kv_only": True})])
def test_a_call_whose_attention_a_cache_replays_makes_no_plan_nothing_uses(method, options):
    """Without merge_mlp only the self-attention merges: where a cache replays it, no block (double-
    or single-stream) makes a plan in that call."""
    from diffusers import PyramidAttentionBroadcastConfig

    transformer, inputs = model(), flux_inputs()
    transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: 500,
    ))
    sdmerge.apply(transformer, method, r=0.25 if method == "grid" else 0.5, blocks=ALL, **options)
    with sdmerge.plan_recording.record_plans(transformer) as plans:
        for t in (0.9, 0.8, 0.7):  # the second call replays every attention
            run(transformer, inputs, t)
    names = sdmerge.diffusion.merged_blocks(transformer)
    assert any(name.startswith("single_transformer_blocks") for name in names)
    assert sorted(plans) == sorted((step, name) for step in (0, 2) for name in names)
