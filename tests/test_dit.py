"""Diffusion transformers: SD3 / SD3.5 (MMDiT joint blocks) and PixArt, on tiny models and pipelines."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0

import sdmerge
from sdmerge.core import proportional_attention_bias
from sdmerge.core.plan import MergePlan
from sdmerge.diffusion import merged_blocks
from sdmerge.diffusion.layout import AttentionTokens
from sdmerge.diffusion.models.sd3 import joint_attention_on_merged_tokens
from sdmerge.diffusion.prompt_importance import joint_attention_mass, prompt_attention_mass
from tests.tiny_dit import (
    PIXART_CALL,
    T5_TOKENS,
    pixart_inputs,
    pixart_transformer,
    run,
    sd3_inputs,
    sd3_transformer,
    sd35_transformer,
    seeded,
    tiny_pixart_pipeline,
    tiny_sd3_img2img_pipeline,
    tiny_sd3_pipeline,
)
from tests.tiny_diffusers import SD_METHODS, sd15_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODELS = {
    "sd3": (lambda: sd3_transformer(num_layers=4), sd3_inputs),
    "sd3.5": (lambda: sd35_transformer(num_layers=4, dual_attention_layers=(0, 1, 2)), sd3_inputs),
    "pixart": (lambda: pixart_transformer(num_layers=3), pixart_inputs),
}
MODES = {
    "attn": {},
    "all-branches": {"merge_crossattn": True, "merge_mlp": True},
    "kv_only": {"kv_only": True},
    "mlp-only": {"merge_attn": False, "merge_mlp": True},
}


# --- every method and mode, r = 1, remove -------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(MODELS))
def test_every_method_and_mode_runs_changes_the_output_and_remove_is_exact(name, mode):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    base = [run(model, inputs, t) for t in (900, 800)]
    processors = dict(model.attn_processors)
    for method in SD_METHODS:
        if mode == "all-branches" and name == "sd3":  # no second attention in SD3-Medium's blocks
            with pytest.raises(ValueError, match="merge_crossattn: none of the merged blocks of this SD3 model"):
                sdmerge.apply(model, method, r=0.5, **seeded(method, **MODES[mode]))
            continue
        r = 0.25 if method == "grid" else 0.5
        sdmerge.apply(model, method, r=r, **seeded(method, **MODES[mode]))
        outs = [run(model, inputs, t) for t in (900, 800)]  # cis / crucial: the second call has a prompt mass
        for out, expected in zip(outs, base):
            assert out.shape == expected.shape and torch.isfinite(out).all(), method
            assert not torch.equal(out, expected), method
        sdmerge.apply(model, method, r=1.0, **seeded(method, **MODES[mode]))
        assert all(torch.equal(run(model, inputs, t), b) for t, b in zip((900, 800), base)), method
    sdmerge.remove(model)
    assert dict(model.attn_processors) == processors
    assert not any("forward" in module.__dict__ for module in model.modules())
    assert all(torch.equal(run(model, inputs, t), b) for t, b in zip((900, 800), base))


def test_default_blocks_are_all_but_the_first_and_the_last_and_blocks_selects_others():
    model = sd3_transformer(num_layers=6)
    sdmerge.apply(model, "tome", r=0.5)
    assert merged_blocks(model) == tuple(f"transformer_blocks.{i}" for i in range(1, 5))
    sdmerge.apply(model, "tome", r=0.5, blocks=range(6))
    assert merged_blocks(model) == tuple(f"transformer_blocks.{i}" for i in range(6))
    sdmerge.apply(model, "tome", r=0.5, blocks=[4, 2])
    assert merged_blocks(model) == ("transformer_blocks.2", "transformer_blocks.4")


def test_options_of_the_other_kind_of_model_are_refused():
    with pytest.raises(ValueError, match=r"max_downsample=2 chooses UNet blocks by resolution.*SD3.*blocks=\(\.\.\.\)"):
        sdmerge.apply(sd3_transformer(), "tome", max_downsample=2)
    with pytest.raises(ValueError, match=r"blocks=\(0,\) selects the blocks of a diffusion transformer.*max_downsample"):
        sdmerge.apply(sd15_unet(), "tome", blocks=[0])
    with pytest.raises(ValueError, match=r"blocks=\(1, 7\): \[7\] are not blocks of this PixArt model \(0 \.\. 2\)"):
        sdmerge.apply(pixart_transformer(num_layers=3), "tome", blocks=(7, 1))
    for bad, error in (([], TypeError), ([1, 1], ValueError), ([-1], ValueError), ("1", TypeError), ([True], TypeError)):
        with pytest.raises(error, match="blocks"):
            sdmerge.apply(sd3_transformer(), "tome", blocks=bad)


def test_a_chunked_feed_forward_is_a_clear_error_with_merge_mlp():
    model, inputs = sd3_transformer(num_layers=3), sd3_inputs(text_tokens=16)  # both streams divide by the chunk
    model.enable_forward_chunking(chunk_size=16, dim=1)
    sdmerge.apply(model, "tome", r=0.5, seed=0, merge_mlp=True)
    with pytest.raises(ValueError, match=r"merge_mlp: transformer_blocks.1.ff got 16 tokens.*disable_forward_chunking"):
        run(model, inputs)
    sdmerge.apply(model, "tome", r=0.5, seed=0)  # without merge_mlp the chunked feed-forward is left alone
    assert torch.isfinite(run(model, inputs)).all()


# --- only image tokens are merged ---------------------------------------------------------------------


def test_sd3_merges_image_tokens_only_and_the_joint_attention_sees_every_prompt_token():
    """The joint attention of a merged block gets M image tokens and all T prompt tokens; its
    prompt output keeps T tokens; the last block (context_pre_only) still works merged."""
    model, inputs = sd3_transformer(num_layers=3), sd3_inputs(batch=2, text_tokens=12)
    seen = []
    for block in model.transformer_blocks:
        block.attn.register_forward_hook(
            lambda module, args, kwargs, out: seen.append((kwargs["hidden_states"].shape[1], kwargs["encoder_hidden_states"].shape[1], out[1].shape[1])),
            with_kwargs=True,
        )
    sdmerge.apply(model, "tome", r=0.5, seed=0, blocks=range(3))
    assert torch.isfinite(run(model, inputs)).all()
    assert seen == [(64, 12, 12)] * 3  # 8x8 grid: the hook outside sdmerge's wrapper sees the block's call
    inner = []
    model.transformer_blocks[2].attn.processor = _Recording(JointAttnProcessor2_0(), inner)
    run(model, inputs)
    assert inner == [(32, 12)]  # inside: 32 merged image tokens, every prompt token


class _Recording:
    def __init__(self, processor, record):
        self.processor, self.record = processor, record

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.record.append((hidden_states.shape[1], None if encoder_hidden_states is None else encoder_hidden_states.shape[1]))
        return self.processor(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


# --- the proportional-attention identity --------------------------------------------------------------


def duplicated(tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``tokens [B, M, C]`` repeated along ``groups [N]`` (token i = group groups[i]): ``[B, N, C]``."""
    return tokens[:, groups]


@pytest.mark.parametrize("context", [True, False], ids=["joint", "attn2-without-prompt"])
@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_joint_attention_over_groups_of_identical_tokens_equals_the_unmerged_attention(context, qk_norm):
    """kv_only's joint attention with keys and values of M merged tokens and log(sizes) on their
    logits equals diffusers' JointAttnProcessor2_0 on the N tokens they stand for (each group of
    s identical tokens), for the image and the prompt outputs."""
    torch.manual_seed(0)
    attn = Attention(
        query_dim=16, heads=2, dim_head=8, out_dim=16, bias=True, added_kv_proj_dim=16 if context else None,
        context_pre_only=False if context else None, processor=JointAttnProcessor2_0(), qk_norm=qk_norm, eps=1e-6,
    ).eval()
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    merged = torch.randn(2, 4, 16)
    hidden_states = duplicated(merged, groups)
    kwargs = {"hidden_states": hidden_states}
    if context:
        kwargs["encoder_hidden_states"] = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = attn(**kwargs)
        plan = MergePlan(groups.expand(2, -1).contiguous(), 4)
        bias = proportional_attention_bias(plan.merged_sizes, hidden_states.dtype)
        merged = plan.merge(hidden_states)
        tokens = AttentionTokens(hidden_states, merged, kwargs.get("encoder_hidden_states"), bias, plan, None, False, None)
        got = joint_attention_on_merged_tokens(attn, (), kwargs, tokens)
    for a, b in zip(got if context else (got,), expected if context else (expected,)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_pixart_self_attention_over_groups_of_identical_tokens_equals_the_unmerged_attention():
    """PixArt's kv_only goes through attn1's encoder_hidden_states with the log(sizes) mask: on a
    whole transformer, image tokens that are identical copies give the unmerged output."""
    model = pixart_transformer(num_layers=2)
    block = model.transformer_blocks[0]
    groups = torch.tensor([0, 0, 1, 2, 2, 2, 3, 1])
    merged = torch.randn(2, 4, 24)
    hidden_states = duplicated(merged, groups)
    plan = MergePlan(groups.expand(2, -1).contiguous(), 4)
    from sdmerge.diffusion.branches import merged_keys_and_values

    with torch.no_grad():
        expected = block.attn1(hidden_states)
        got = block.attn1(hidden_states, **merged_keys_and_values(plan, None, hidden_states))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# --- importance ----------------------------------------------------------------------------------------


def test_joint_attention_mass_is_the_attention_the_prompt_pays_to_each_image_token():
    """Hand-built: the full joint attention matrix (image first, prompt second), softmax over all
    keys, the prompt's rows averaged over prompt tokens and heads, at the image columns."""
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8, out_dim=16, bias=True, added_kv_proj_dim=16,
                     context_pre_only=False, processor=JointAttnProcessor2_0(), qk_norm="rms_norm", eps=1e-6)
    image, text = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        def heads(x):
            return x.view(2, -1, 2, 8).transpose(1, 2)
        q = torch.cat([attn.norm_q(heads(attn.to_q(image))), attn.norm_added_q(heads(attn.add_q_proj(text)))], dim=2)
        k = torch.cat([attn.norm_k(heads(attn.to_k(image))), attn.norm_added_k(heads(attn.add_k_proj(text)))], dim=2)
        full = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(dim=-1)  # [B, H, 9, 9]
        expected = full[:, :, 6:, :6].mean(dim=(1, 2))
        got = joint_attention_mass(attn, image, text)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert got.shape == (2, 6) and (got > 0).all() and (got.sum(dim=1) < 1).all()


def test_t5_prompt_mass_leaves_out_the_end_token_of_each_prompt():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=4)
    h, context = torch.randn(2, 10, 16), torch.randn(2, 6, 8)
    mask = torch.zeros(2, 1, 6)
    mask[0, 0, 4:] = -10000.0  # sample 0: 4 tokens (end token at 3); sample 1: 6 tokens (end token at 5)
    q = attn.to_q(h).view(2, 10, 2, 4).transpose(1, 2)
    k = attn.to_k(context).view(2, 6, 2, 4).transpose(1, 2)
    probabilities = (q @ k.transpose(-1, -2) / 2 + mask[:, None]).softmax(dim=-1)
    words = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float32)
    expected = (probabilities * words[:, None, None]).sum(dim=-1).mean(dim=1)
    torch.testing.assert_close(prompt_attention_mass(attn, h, context, mask, special="end"), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_cis_weights_change_the_output_and_crucial_uses_importance(name):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    sdmerge.apply(model, "tome", r=0.5, use_rand=False, blocks=range(3))
    tome = [run(model, inputs, t) for t in (900, 800)]
    sdmerge.apply(model, "cis", r=0.5, use_rand=False, blocks=range(3))
    cis = [run(model, inputs, t) for t in (900, 800)]
    if name == "sd3":  # the joint attention gives the call's own prompt mass: weighted from the first call
        assert not torch.equal(cis[0], tome[0]) and not torch.equal(cis[1], tome[1])
    else:  # the cross-attention's mass comes from the previous call: the first call is tome's
        assert torch.equal(cis[0], tome[0]) and not torch.equal(cis[1], tome[1])


# --- plan reuse, timestep window, seeds -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_share_plans_makes_one_plan_per_call_for_every_block(name, monkeypatch):
    from sdmerge.diffusion import MergedBlock

    computed = []
    original = MergedBlock._new_plan
    monkeypatch.setattr(MergedBlock, "_new_plan", lambda self, *a: computed.append(self.name) or original(self, *a))
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    sdmerge.apply(model, "atc_average", r=0.5, blocks=range(3))
    run(model, inputs)
    assert len(computed) == 3
    computed.clear()
    sdmerge.apply(model, "atc_average", r=0.5, blocks=range(3), share_plans=True, plan_every=2)
    for t in (900, 800, 700, 600):
        run(model, inputs, t)
    assert computed == ["transformer_blocks.0", "transformer_blocks.0"]  # steps 0 and 2, once per call


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_timestep_range_and_seeds(name):
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    base = {t: run(model, inputs, t) for t in (900, 400)}
    sdmerge.apply(model, "tome", r=0.5, seed=3, timestep_range=(500, 1000))
    merged = {t: run(model, inputs, t) for t in (900, 400)}
    assert not torch.equal(merged[900], base[900]) and torch.equal(merged[400], base[400])
    sdmerge.apply(model, "tome", r=0.5, seed=3)
    assert torch.equal(run(model, inputs, 900), merged[900])  # the same seed: the same patterns
    sdmerge.apply(model, "tome", r=0.5, seed=4)
    assert not torch.equal(run(model, inputs, 900), merged[900])


# --- pipelines ---------------------------------------------------------------------------------------------


def sd3_call(pipe, **extra):
    return pipe("a red cat", height=32, width=32, num_inference_steps=2, max_sequence_length=T5_TOKENS,
                generator=torch.Generator().manual_seed(0), output_type="pt", **extra).images


def pixart_call(pipe, **extra):
    return pipe("a red cat", height=32, width=32, num_inference_steps=2, max_sequence_length=T5_TOKENS,
                generator=torch.Generator().manual_seed(0), output_type="pt", **PIXART_CALL, **extra).images


@pytest.mark.parametrize("method", SD_METHODS)
def test_sd3_and_pixart_pipelines_merge_and_remove_exactly(method):
    pixart = tiny_pixart_pipeline(transformer=pixart_transformer(num_layers=3))
    for pipe, call in ((tiny_sd3_pipeline(), sd3_call), (pixart, pixart_call)):
        pipe.set_progress_bar_config(disable=True)
        base = call(pipe)
        sdmerge.apply(pipe, method, r=0.25 if method == "grid" else 0.5, **seeded(method, blocks=range(3)))
        merged = call(pipe)
        assert torch.isfinite(merged).all() and not torch.equal(merged, base)
        assert torch.equal(call(pipe), merged)  # identical pipeline calls, identical images
        sdmerge.remove(pipe)
        assert torch.equal(call(pipe), base)


def test_pipelines_with_odd_sizes_batches_guidance_and_img2img():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sdmerge.apply(pipe, "cis", r=0.5, seed=0, blocks=range(3), merge_mlp=True)
    wide = pipe(["a cat", "a dog"], height=24, width=44, num_inference_steps=2, max_sequence_length=T5_TOKENS,
                num_images_per_prompt=2, guidance_scale=5.0, output_type="pt").images  # a 6x11 token grid
    assert wide.shape == (4, 3, 24, 44) and torch.isfinite(wide).all()
    img2img = tiny_sd3_img2img_pipeline(pipe)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = img2img("a cat", image=image, strength=0.6, num_inference_steps=4, max_sequence_length=T5_TOKENS,
                  output_type="pt").images
    assert torch.isfinite(out).all()
    pixart = tiny_pixart_pipeline(transformer=pixart_transformer(num_layers=3))
    pixart.set_progress_bar_config(disable=True)
    sdmerge.apply(pixart, "crucial", r=0.5, blocks=range(3), kv_only=True)
    odd = pixart(["a cat", "a dog"], height=40, width=24, num_inference_steps=2, max_sequence_length=T5_TOKENS,
                 guidance_scale=4.5, output_type="pt", **PIXART_CALL).images
    assert odd.shape == (2, 3, 40, 24) and torch.isfinite(odd).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["sd3.5", "pixart"])
def test_half_precision(name, dtype):
    build, make_inputs = MODELS[name]
    model = build().to(dtype)
    inputs = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in make_inputs().items()}
    for method in ("tome", "atc_average", "cis", "grid"):
        sdmerge.apply(model, method, r=0.25 if method == "grid" else 0.5, **seeded(method, merge_mlp=True))
        out = run(model, inputs)
        assert out.dtype == dtype and torch.isfinite(out).all(), method


# --- gradient checkpointing and torch.compile ---------------------------------------------------------


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_gradient_checkpointing_recomputes_the_forward_merge(name):
    build, make_inputs = MODELS[name]

    def gradients(checkpointing: bool):
        model = build().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        torch.manual_seed(5)
        sdmerge.apply(model, "tome", r=0.5, merge_mlp=True, blocks=range(3))  # the unseeded split
        inputs = make_inputs()
        loss = model(**inputs).sample.square().mean()
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    expected, got = gradients(False), gradients(True)
    assert expected.keys() == got.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize(
    "name, method, options",
    [
        ("sd3", "tome", {"seed": 0}),
        ("sd3", "grid", {"kv_only": True}),
        ("sd3.5", "tome", {"seed": 0, "merge_crossattn": True, "merge_mlp": True}),
        ("pixart", "grid", {}),
        ("pixart", "tome", {"use_rand": False, "kv_only": True, "merge_crossattn": True, "merge_mlp": True}),
    ],
)
def test_fullgraph_compile_equals_eager(name, method, options):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    build, make_inputs = MODELS[name]
    model, inputs = build(), make_inputs()
    r = 0.25 if method == "grid" else 0.5
    sdmerge.apply(model, method, r=r, blocks=range(3), **options)
    eager = [run(model, inputs, t) for t in (900, 800, 700)]
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    frames = []
    for t, expected in zip((900, 800, 700), eager):
        assert torch.equal(run(compiled, inputs, t), expected)
        frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[2]  # no recompile from one step to the next
    sdmerge.remove(model)
    assert torch.equal(run(compiled, inputs, 900), run(model, inputs, 900))  # the compiled model sees the removal
    torch._dynamo.reset()
