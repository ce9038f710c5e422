"""Stable Diffusion edge cases: compiled UNets, processor changes after ``apply``,
small and odd latents, token grids the UNet really produces, bad values, ``help``, ControlNets,
and what must keep working (deepcopy, state_dict, odd latents and half precision)."""

from __future__ import annotations

import copy
import logging
import pydoc
import re
import warnings

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from torch._dynamo.testing import CompileCounter
from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0, SlicedAttnProcessor

import sdmerge
from sdmerge import diffusion
from sdmerge.core import bipartite_soft_matching, check_keep_rate, random_2d_split
from sdmerge.methods import METHODS
from sdmerge.diffusion import merged_blocks
from tests.test_stable_diffusion import Capture, RecordingProcessor, forward, merged_attention
from tests.tiny_diffusers import SD15_MERGED, SD_METHODS, sd15_unet, two_level_unet, unet_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGGER = "sdmerge.diffusion"


def sdmerge_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(LOGGER) and r.levelno == logging.WARNING]


def processors(unet) -> dict:
    return dict(unet.attn_processors)


# --- 1. torch.compile ---------------------------------------------------------------------------


COMPILED = CompileCounter()
"""The tests' torch.compile backend: eager (no code generation, fast), counting the frames dynamo
compiles; one object, so that the second test may reuse the first one's graphs (dynamo's guards
decide whether they fit)."""


def test_compile_then_apply_and_remove():
    unet = two_level_unet()
    inputs = unet_inputs(size=8)
    base = forward(unet, *inputs)
    counter = COMPILED
    compiled = torch.compile(unet, backend=counter)
    assert torch.equal(forward(compiled, *inputs), base)  # compiled before apply, and run once
    originals = processors(unet)

    assert sdmerge.apply(compiled, "tome", r=0.5, use_rand=False) is compiled
    assert merged_blocks(compiled) == merged_blocks(unet) != ()
    eager = forward(unet, *inputs)  # the module it wraps, uncompiled
    assert not torch.equal(eager, base)
    frames = counter.frame_count
    assert torch.equal(forward(compiled, *inputs), eager)
    assert counter.frame_count > frames  # recompiled for the patch, not run as plain Python

    sdmerge.remove(compiled)
    assert all(unet.attn_processors[name] is p for name, p in originals.items())
    assert torch.equal(forward(compiled, *inputs), base)


def test_apply_then_compile_runs_the_patched_model_and_remove_works():
    unet = two_level_unet(seed=1)
    inputs = unet_inputs(size=8)
    base = forward(unet, *inputs)
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False)
    eager = forward(unet, *inputs)
    compiled = torch.compile(unet, backend=COMPILED)
    assert torch.equal(forward(compiled, *inputs), eager)
    sdmerge.remove(compiled)
    assert merged_blocks(unet) == ()
    assert torch.equal(forward(compiled, *inputs), base)


def test_pipeline_with_a_compiled_unet():
    """diffusers' documented ``pipe.unet = torch.compile(pipe.unet)`` (not run: patching only)."""
    from tests.tiny_diffusers import tiny_pipeline

    pipe = tiny_pipeline()
    unet = pipe.unet
    originals = processors(unet)
    pipe.unet = torch.compile(unet, backend="eager")
    assert diffusion.accepts(pipe)
    sdmerge.apply(pipe, "atc_average", r=0.5)
    assert merged_blocks(pipe) == SD15_MERGED
    assert all(unet.attn_processors[name] is p for name, p in originals.items())  # hooks, not processors
    sdmerge.remove(pipe)
    assert all(unet.attn_processors[name] is p for name, p in originals.items())

    pipe.unet = unet  # the other order: apply, then compile, then remove
    sdmerge.apply(pipe, "tome")
    pipe.unet = torch.compile(unet, backend=COMPILED)
    assert merged_blocks(pipe) == SD15_MERGED
    sdmerge.remove(pipe)
    assert merged_blocks(pipe) == ()
    assert all(unet.attn_processors[name] is p for name, p in originals.items())


# --- 2, 3. processors replaced after apply ---------------------------------------------------------


def test_set_default_attn_processor_after_apply_keeps_merging(caplog):
    """diffusers' set_default_attn_processor works on a patched UNet: the default processor runs
    on merged tokens, as if it had been set before apply; remove leaves it."""
    inputs = unet_inputs()
    reference = sd15_unet()
    reference.set_default_attn_processor()
    plain = forward(reference, *inputs)
    sdmerge.apply(reference, "cis", r=0.5, use_rand=False)
    expected = [forward(reference, *inputs, t) for t in (900, 800)]

    unet = sd15_unet()
    sdmerge.apply(unet, "cis", r=0.5, use_rand=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        unet.set_default_attn_processor()
        got = [forward(unet, *inputs, t) for t in (900, 800)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[0], plain)
    assert sdmerge_warnings(caplog) == []  # nothing to warn about: sdmerge replaces no processor
    sdmerge.remove(unet)
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
    assert torch.equal(forward(unet, *inputs), plain)
    unet.set_default_attn_processor()  # diffusers' own method again


def test_attention_slicing_after_apply_keeps_merging_without_warnings(caplog):
    inputs = unet_inputs()
    reference = sd15_unet()
    reference.set_attention_slice(2)
    plain = forward(reference, *inputs)
    sdmerge.apply(reference, "tome", r=0.5, use_rand=False)
    expected = forward(reference, *inputs)

    unet = sd15_unet()
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER), warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on any call
        unet.set_attention_slice(2)
        outs = [forward(unet, *inputs) for _ in range(3)]
    assert all(torch.equal(out, expected) for out in outs)
    assert not torch.equal(expected, plain)
    assert sdmerge_warnings(caplog) == []
    sliced = unet.get_submodule(SD15_MERGED[0]).attn1.processor
    assert isinstance(sliced, SlicedAttnProcessor)
    sdmerge.remove(unet)
    assert unet.get_submodule(SD15_MERGED[0]).attn1.processor is sliced  # the user's
    assert torch.equal(forward(unet, *inputs), plain)


def test_set_attn_processor_after_apply_keeps_merging_and_is_kept_by_remove():
    inputs = unet_inputs()
    unet = sd15_unet()
    sdmerge.apply(unet, "tome", r=0.3)
    recording = RecordingProcessor()
    unet.set_attn_processor(recording)
    forward(unet, *inputs)
    merged_count = 256 - int(256 * 0.7)
    assert recording.token_counts.count(merged_count) == len(SD15_MERGED)  # attn1 of merged blocks only
    sdmerge.remove(unet)
    assert all(p is recording for p in unet.attn_processors.values())


@pytest.mark.parametrize("method", ["tome", "cis"])  # cis: attn2 is hooked too
def test_fused_qkv_after_apply_equals_apply_after_fusing(method):
    inputs = unet_inputs()
    options = {"use_rand": False}
    calls = (900, 800)

    fused_first = sd15_unet()
    fused_first.fuse_qkv_projections()
    fused_plain = forward(fused_first, *inputs)
    sdmerge.apply(fused_first, method, r=0.5, **options)
    expected = [forward(fused_first, *inputs, t) for t in calls]

    unet = sd15_unet()
    originals = processors(unet)
    base = forward(unet, *inputs)
    sdmerge.apply(unet, method, r=0.5, **options)
    unfused = [forward(unet, *inputs, t) for t in calls]
    sdmerge.apply(unet, method, r=0.5, **options)
    unet.fuse_qkv_projections()
    assert all(torch.equal(forward(unet, *inputs, t), out) for t, out in zip(calls, expected))
    assert isinstance(unet.get_submodule(SD15_MERGED[0]).attn1.processor, FusedAttnProcessor2_0)
    unet.unfuse_qkv_projections()  # puts the first processors back: still merging, unfused
    sdmerge.apply(unet, method, r=0.5, **options)  # fresh state (the prompt mass), same processors
    assert all(torch.equal(forward(unet, *inputs, t), out) for t, out in zip(calls, unfused))

    unet.fuse_qkv_projections()
    forward(unet, *inputs)
    sdmerge.remove(unet)  # fused processors stay; unfuse then restores the originals
    assert torch.equal(forward(unet, *inputs), fused_plain)
    unet.unfuse_qkv_projections()
    assert all(unet.attn_processors[name] is p for name, p in originals.items())
    assert torch.equal(forward(unet, *inputs), base)


# --- 4, 5. token grids --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["tome", "cis"])
@pytest.mark.parametrize("latent", [(8, 12), (7, 13)])
def test_a_grid_smaller_than_one_window_runs_unmerged_and_logs_once(method, latent, caplog):
    """max_downsample=8 merges the mid block, whose grid is 1x2 at these latents."""
    unet = sd15_unet()
    inputs = unet_inputs(size=latent)
    mid = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0")
    recording = RecordingProcessor()
    mid.attn1.set_processor(recording)
    base = forward(unet, *inputs)
    sdmerge.apply(unet, method, r=0.5, max_downsample=8, seed=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        outs = [forward(unet, *inputs, t) for t in (900, 800)]
    assert all(torch.isfinite(out).all() and not torch.equal(out, base) for out in outs)
    assert recording.token_counts == [2, 2, 2]  # unmerged at every call
    logged = sdmerge_warnings(caplog)
    assert len(logged) == 1, logged  # once, for the one block whose grid holds no window
    assert "mid_block.attentions.0.transformer_blocks.0 has a 1x2 token grid" in logged[0]
    assert "max_downsample=8" in logged[0]


@pytest.mark.parametrize("latent, grid", [((9, 9), (4, 4)), ((9, 13), (4, 6))])
def test_the_grid_is_what_the_unet_produces_not_a_rounding_rule(latent, grid):
    """downsample_padding=0: a 3x3 stride-2 convolution without padding takes 9 -> 4 (the
    rounding rule ceil(9 / 2) says 5). The level-1 block's split is that of its real grid."""
    unet = two_level_unet(downsample_padding=0)
    inputs = unet_inputs(size=latent)
    sdmerge.apply(unet, "tome", r=0.5, max_downsample=2, use_rand=False)
    name = "down_blocks.1.attentions.0.transformer_blocks.0"
    block = unet.get_submodule(name)
    with Capture(block) as calls:
        out = forward(unet, *inputs)
    assert torch.isfinite(out).all()
    call = calls[0]
    N = grid[0] * grid[1]
    assert call.x.shape[1] == N
    plan = bipartite_soft_matching(call.x, int(N * 0.5), *random_2d_split(*grid))  # top-left destinations
    expected = merged_attention(block.attn1, block.attn1.processor, call.h, plan.labels, plan.num_groups)
    torch.testing.assert_close(call.out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("latent", [(9, 13), (7, 7), (12, 8)])
def test_every_method_on_odd_and_non_square_latents(latent):
    unet = sd15_unet()
    inputs = unet_inputs(batch=1, size=latent)
    base = forward(unet, *inputs)
    for method in SD_METHODS:
        sdmerge.apply(unet, method, r=0.5, **({"seed": 0} if METHODS[method].needs_split else {}))
        for t in (900, 800):
            out = forward(unet, *inputs, t)
            assert out.shape == base.shape and torch.isfinite(out).all(), method
        assert not torch.equal(out, base), method


# --- 6. bad values ------------------------------------------------------------------------------


def test_keep_rates_must_be_real_numbers_not_bool_or_str():
    unet = sd15_unet()
    for bad in ("0.5", True, False, np.bool_(True), torch.tensor(0.5)):
        with pytest.raises(ValueError, match=rf"keep rate r={re.escape(repr(bad))} .* is not a number.*0 < r <= 1"):
            sdmerge.apply(unet, "tome", r=bad)
        with pytest.raises(ValueError, match="is not a number.*a bool or str is not taken as one"):
            check_keep_rate(bad)
    assert merged_blocks(unet) == ()
    for good in (0.5, 1, np.float32(0.5), np.float64(0.25), np.int64(1)):
        sdmerge.apply(unet, "tome", r=good)
        assert type(unet._sdmerge.config.keep_rate) is float and unet._sdmerge.config.keep_rate == float(good)


def test_max_downsample_must_be_a_power_of_two():
    unet = sd15_unet()
    for bad in (3, 5, 6, 12):
        with pytest.raises(ValueError, match=rf"max_downsample={bad} is not a power of two; allowed: 1, 2, 4, 8"):
            sdmerge.apply(unet, "tome", max_downsample=bad)
    for good in (1, 2, 4, 8, 16):
        sdmerge.apply(unet, "tome", max_downsample=good)


# --- 7, 8. help and ControlNets -----------------------------------------------------------------


def test_help_lists_every_method_and_every_declared_option_of_each_family():
    """help(sdmerge.apply) is built from the declarations: every method of each family, and every
    option with its kind, default and meaning; no pointer to files an installed package lacks."""
    from dataclasses import MISSING

    from sdmerge.api import FAMILIES
    from sdmerge.options import declared

    text = pydoc.render_doc(sdmerge.apply, renderer=pydoc.plaintext)
    assert "docs/" not in text
    flat = " ".join(text.split())
    for tag, _, declaration, skip in FAMILIES:
        methods = ", ".join(name for name, m in METHODS.items() if tag in m.models)
        assert f"methods: {methods}" in flat
        for f in declared(declaration):
            if f.name in skip:
                continue
            head = f"{f.name}: {f.metadata['check'].kind}" + ("" if f.default is MISSING else f" = {f.default!r}")
            assert head in flat, head
            assert " ".join(f.metadata["meaning"].split()) in flat, f.name


def test_a_controlnet_is_refused_with_what_to_pass_instead():
    controlnet = ControlNetModel.from_unet(sd15_unet(), conditioning_embedding_out_channels=(16, 32))
    message = r"ControlNetModel is a ControlNet, which sdmerge leaves unmerged.*sdmerge\.apply\(pipe\.unet\)"
    for call in (sdmerge.apply, sdmerge.remove, diffusion.apply):
        with pytest.raises(TypeError, match=message):
            call(controlnet)


# --- what works and must keep working -------------------------------------------------------------


def test_deepcopy_of_a_patched_unet_is_patched_on_its_own():
    inputs = unet_inputs()
    unet = sd15_unet()
    base = forward(unet, *inputs)
    sdmerge.apply(unet, "cis", r=0.5, use_rand=False)
    merged = [forward(unet, *inputs, t) for t in (900, 800)]
    sdmerge.apply(unet, "cis", r=0.5, use_rand=False)  # fresh state, as deepcopy will copy it
    twin = copy.deepcopy(unet)
    assert twin._sdmerge.layout.denoiser is twin
    assert all(torch.equal(forward(twin, *inputs, t), out) for t, out in zip((900, 800), merged))
    sdmerge.remove(twin)
    assert merged_blocks(twin) == () and merged_blocks(unet) == SD15_MERGED
    assert not torch.equal(forward(unet, *inputs), base)
    assert torch.equal(forward(twin, *inputs), base)
    sdmerge.remove(unet)
    assert torch.equal(forward(unet, *inputs), base)


def test_apply_leaves_the_state_dict_unchanged():
    unet = sd15_unet()
    before = unet.state_dict()
    before = {name: tensor.clone() for name, tensor in before.items()}
    for method in ("tome", "cis", "crucial"):
        sdmerge.apply(unet, method)
        forward(unet, *unet_inputs())
        after = unet.state_dict()
        assert list(after) == list(before), method
        assert all(torch.equal(after[name], tensor) for name, tensor in before.items()), method
    sdmerge.remove(unet)
    assert list(unet.state_dict()) == list(before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_an_odd_non_square_latent(dtype):
    """Both half types run on CPU here; the recorded grids and the split do not depend on dtype."""
    unet = sd15_unet().to(dtype)
    sample, context = unet_inputs(batch=3, size=(9, 13))
    sample, context = sample.to(dtype), context.to(dtype)
    base = forward(unet, sample, context)
    for method in ("tome", "cis", "atc_average"):
        sdmerge.apply(unet, method, r=0.5, max_downsample=2)
        out = forward(unet, sample, context)
        assert out.dtype == dtype and torch.isfinite(out).all() and not torch.equal(out, base), method
