"""sdmerge.apply / remove on tiny diffusers UNets (SD-1.5 and SDXL block layouts, random weights)."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import tomesd
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

import sdmerge
from sdmerge import diffusion
from sdmerge.core import bipartite_soft_matching, cosine_distances, crucial_token_merging, random_2d_split
from sdmerge.methods import METHODS
from sdmerge.diffusion.forward_hooks import ForwardHook
from sdmerge.diffusion.prompt_importance import cross_attention_mass, prompt_attention_mass
from sdmerge.diffusion import merged_blocks
from sdmerge.diffusion.models.unet import transformer_blocks_by_level
from tests.tiny_diffusers import (
    SD15_MERGED,
    SD_METHODS,
    sd15_unet,
    sdxl_conditions,
    sdxl_unet,
    unet_inputs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIPARTITE = tuple(name for name in SD_METHODS if METHODS[name].needs_split)


def forward(unet, sample, context, t=500, **kwargs):
    with torch.no_grad():
        return unet(sample, t, context, **kwargs).sample


def hook_counts(module):
    """Per submodule: its PyTorch hooks, and whether an instance ``forward`` wraps its own (sdmerge's hooks)."""
    return {
        name: (len(m._forward_pre_hooks) + len(m._forward_hooks), "forward" in m.__dict__)
        for name, m in module.named_modules()
    }


class Capture:
    """Records, at every call of one transformer block: its input ``x``, attn1's input ``h`` and
    (unmerged) output ``out``, attn2's input ``h2`` and prompt embeddings ``context``. The input
    hooks run before sdmerge's (``prepend``), so they see the tokens before merging."""

    def __init__(self, block):
        self.calls = []

        def on_block(module, args, kwargs):
            self.calls.append(SimpleNamespace(x=args[0] if args else kwargs["hidden_states"]))

        def on_attn1_input(module, args):
            self.calls[-1].h = args[0]

        def on_attn1_output(module, args, output):
            self.calls[-1].out = output

        def on_attn2(module, args, kwargs):
            self.calls[-1].h2, self.calls[-1].context = args[0], kwargs["encoder_hidden_states"]

        self.handles = [
            block.register_forward_pre_hook(on_block, with_kwargs=True, prepend=True),
            block.attn1.register_forward_pre_hook(on_attn1_input, prepend=True),
            block.attn1.register_forward_hook(on_attn1_output),
            block.attn2.register_forward_pre_hook(on_attn2, with_kwargs=True, prepend=True),
        ]

    def __enter__(self):
        return self.calls

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def merged_attention(attn, processor, h, labels, num_groups, weights=None):
    """By hand: weighted mean of ``h`` [B, N, C] over each group, ``processor`` on the means,
    every token gets its group's output row."""
    B, N, C = h.shape
    weights = torch.ones(B, N) if weights is None else weights
    means = torch.stack(
        [
            torch.zeros(num_groups, C).index_add_(0, labels[b], h[b] * weights[b, :, None])
            / torch.zeros(num_groups).index_add_(0, labels[b], weights[b])[:, None]
            for b in range(B)
        ]
    )
    with torch.no_grad():
        out = processor(attn, means)
    return torch.stack([out[b, labels[b]] for b in range(B)])


@pytest.fixture(scope="module")
def inputs():
    return unet_inputs(batch=2)


# --- which blocks, identity at r = 1, remove -------------------------------------------------


def test_default_merges_the_blocks_tomesd_merges_on_sd15():
    unet = sd15_unet()
    sdmerge.apply(unet)  # api default keep rate: 0.5
    assert merged_blocks(unet) == SD15_MERGED
    assert unet._sdmerge.config.keep_rate == 0.5
    sdmerge.apply(unet, max_downsample=2)
    levels = {name: level for name, _, level in transformer_blocks_by_level(unet)}
    assert {levels[name] for name in merged_blocks(unet)} == {0, 1}
    assert len(merged_blocks(unet)) == 10


@pytest.mark.parametrize("method", SD_METHODS)
def test_keep_rate_one_is_bit_identical(method, inputs):
    unet = sd15_unet()
    before = [forward(unet, *inputs, t) for t in (900, 800)]
    sdmerge.apply(unet, method, r=1.0)
    after = [forward(unet, *inputs, t) for t in (900, 800)]  # the second call has a prompt mass
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_remove_restores_processor_objects_hooks_and_output(inputs):
    unet = sd15_unet()
    processors, hooks = dict(unet.attn_processors), hook_counts(unet)
    before = forward(unet, *inputs)
    sdmerge.apply(unet, "cis", r=0.5)  # hooks on attn1 and attn2; no processor is replaced
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
    assert not torch.equal(forward(unet, *inputs), before)
    assert hook_counts(unet) != hooks
    sdmerge.remove(unet)
    assert all(unet.attn_processors[name] is processor for name, processor in processors.items())
    assert hook_counts(unet) == hooks
    assert not hasattr(unet, "_sdmerge")
    assert torch.equal(forward(unet, *inputs), before)
    sdmerge.remove(unet)  # removing twice does nothing


def test_apply_again_replaces_the_previous_patch(inputs):
    unet = sd15_unet()
    originals = dict(unet.attn_processors)
    sdmerge.apply(unet, "cis", r=0.6)
    sdmerge.apply(unet, "atc_average", r=0.4)
    assert isinstance(unet.forward.__self__, ForwardHook)
    assert not isinstance(unet.forward.__self__.wrapped.__self__, ForwardHook)  # one wrapper, not two
    assert all(unet.attn_processors[name] is processor for name, processor in originals.items())
    assert all("forward" not in block.attn2.__dict__ for block in map(unet.get_submodule, SD15_MERGED))  # cis's mass hook
    twice = forward(unet, *inputs)
    sdmerge.remove(unet)
    sdmerge.apply(unet, "atc_average", r=0.4)
    assert torch.equal(forward(unet, *inputs), twice)


class RecordingProcessor:
    """A custom processor: diffusers' SDPA processor that records how many tokens it sees."""

    def __init__(self):
        self.token_counts = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.token_counts.append(hidden_states.shape[1])
        return AttnProcessor2_0()(attn, hidden_states, *args, **kwargs)


def test_custom_processor_runs_on_merged_tokens_and_is_never_replaced(inputs):
    unet = sd15_unet()
    merged = unet.get_submodule(SD15_MERGED[0]).attn1
    unmerged = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0").attn1
    custom_merged, custom_unmerged = RecordingProcessor(), RecordingProcessor()
    merged.set_processor(custom_merged)
    unmerged.set_processor(custom_unmerged)
    sdmerge.apply(unet, "tome", r=0.3)
    assert merged.processor is custom_merged and unmerged.processor is custom_unmerged
    forward(unet, *inputs)
    assert custom_merged.token_counts == [256 - int(256 * 0.7)]  # 16x16 latent: 256 tokens, 179 removed
    assert custom_unmerged.token_counts == [64]
    sdmerge.remove(unet)
    assert merged.processor is custom_merged and unmerged.processor is custom_unmerged


def test_replaced_processors_keep_merging_and_are_kept_by_remove(inputs):
    unet = sd15_unet()
    sdmerge.apply(unet, "tome", use_rand=False)
    expected = forward(unet, *inputs)
    replacement = AttnProcessor2_0()
    unet.set_attn_processor(replacement)
    assert torch.equal(forward(unet, *inputs), expected)  # the hooks are on the attention modules
    assert unet.get_submodule(SD15_MERGED[0]).attn1.processor is replacement
    sdmerge.remove(unet)
    assert all(processor is replacement for processor in unet.attn_processors.values())


# --- equivalence with oracles -----------------------------------------------------------------


@pytest.mark.parametrize(
    "keep_rate, batch, max_downsample", [(0.9, 2, 1), (0.5, 2, 1), (0.3, 2, 1), (0.5, 3, 1), (0.5, 2, 2)]
)
def test_tome_without_randomness_equals_tomesd(keep_rate, batch, max_downsample):
    unet = sd15_unet()
    sample, context = unet_inputs(batch=batch)
    base = forward(unet, sample, context)
    tomesd.apply_patch(unet, ratio=1 - keep_rate, use_rand=False, max_downsample=max_downsample)
    expected = forward(unet, sample, context)
    tomesd.remove_patch(unet)
    sdmerge.apply(unet, "tome", r=keep_rate, use_rand=False, max_downsample=max_downsample)
    got = forward(unet, sample, context)
    assert (expected - base).abs().max() > 1e-3  # tomesd did merge
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("link", ["single", "complete", "average"])
def test_atc_in_the_unet_equals_scipy_partition(link, inputs):
    unet = sd15_unet()
    keep_rate = 0.4
    sdmerge.apply(unet, f"atc_{link}", r=keep_rate)
    block = unet.get_submodule(SD15_MERGED[0])
    with Capture(block) as calls:
        forward(unet, *inputs)
    call = calls[0]
    B, N, _ = call.x.shape
    k = N - math.floor(N * (1 - keep_rate) + 1e-6)
    labels = []
    for b in range(B):
        distances = cosine_distances(call.x[b : b + 1])[0].numpy()
        partition = fcluster(linkage(squareform(distances, checks=False), method=link), k, "maxclust") - 1
        assert len(set(partition)) == k
        labels.append(torch.as_tensor(partition, dtype=torch.int64))
    expected = merged_attention(block.attn1, block.attn1.processor, call.h, torch.stack(labels), k)
    torch.testing.assert_close(call.out, expected, atol=1e-5, rtol=1e-5)


def test_prompt_attention_mass_matches_hand_computation():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=4)
    h, context = torch.randn(2, 10, 16), torch.randn(2, 5, 8)
    mask = torch.zeros(2, 1, 5)
    mask[1, 0, 3:] = -10000.0  # sample 1 ignores prompt tokens 3 and 4

    q = attn.to_q(h).view(2, 10, 2, 4).transpose(1, 2)  # [B, H, N, d]
    k = attn.to_k(context).view(2, 5, 2, 4).transpose(1, 2)  # [B, H, T, d]
    for attention_mask in (None, mask):
        logits = q @ k.transpose(-1, -2) / math.sqrt(4) + (0 if attention_mask is None else attention_mask[:, None])
        expected = logits.softmax(dim=-1)[..., 1:].sum(dim=-1).mean(dim=1)
        got = prompt_attention_mass(attn, h, context, attention_mask)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)

    # a forward hook's view of attn2's call; an IP-Adapter's (prompt, image embeddings): the prompt's mass
    expected = prompt_attention_mass(attn, h, context, mask)
    for prompt in (context, (context, [torch.randn(2, 4, 8)])):
        kwargs = {"encoder_hidden_states": prompt, "attention_mask": mask}
        torch.testing.assert_close(cross_attention_mass(attn, (h,), kwargs, None), expected, atol=0, rtol=0)
    with pytest.raises(TypeError, match="prompt embeddings as one tensor.*got NoneType"):
        cross_attention_mass(attn, (h,), {}, None)


@pytest.mark.parametrize("method", ["cis", "crucial"])
def test_importance_is_previous_prompt_mass_times_value_norm(method, inputs):
    """S_i = p_i * ||v_i||: p from attn2 at the previous call of the generation; none at the first
    call (cis: uniform weights, i.e. tome; crucial: uniform p)."""
    unet = sd15_unet()
    keep_rate = 0.5
    sdmerge.apply(unet, method, r=keep_rate, **({"use_rand": False} if method in BIPARTITE else {}))
    block = unet.get_submodule(SD15_MERGED[0])
    with Capture(block) as calls:
        forward(unet, *inputs, t=900)
        forward(unet, *inputs, t=800)
    first, second = calls
    attn2, heads = block.attn2, block.attn2.heads
    B, N, C = first.h2.shape
    q = attn2.to_q(first.h2).view(B, N, heads, -1).transpose(1, 2)
    k = attn2.to_k(first.context).view(B, first.context.shape[1], heads, -1).transpose(1, 2)
    p = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1)[..., 1:].sum(dim=-1).mean(dim=1)

    remove = int(N * (1 - keep_rate))
    original = block.attn1.processor
    for call, mass in ((first, None), (second, p)):
        with torch.no_grad():
            importance = block.attn1.to_v(call.h).norm(dim=-1) * (1.0 if mass is None else mass)
        if method == "cis":
            plan = bipartite_soft_matching(call.x, remove, *random_2d_split(16, 16))  # top-left destinations
            weights = None if mass is None else importance
        else:
            plan = crucial_token_merging(call.x, importance, remove)
            weights = importance
        expected = merged_attention(block.attn1, original, call.h, plan.labels, plan.num_groups, weights)
        torch.testing.assert_close(call.out, expected, atol=1e-5, rtol=1e-5)
    unweighted = merged_attention(block.attn1, original, second.h, plan.labels, plan.num_groups)
    assert (second.out - unweighted).abs().max() > 1e-4  # the importance weights matter


def test_generation_boundaries_reset_the_prompt_mass():
    """cis equals tome exactly when no prompt mass exists: at the first call of a generation,
    which starts when the timestep grows or the sample's shape changes."""
    unet = sd15_unet()
    pair, triple = unet_inputs(batch=2), unet_inputs(batch=3)
    calls = [(pair, 900), (pair, 800), (pair, 950), (pair, 950), (triple, 700), (triple, 600)]

    def outputs(method):
        sdmerge.apply(unet, method, r=0.5, use_rand=False)
        return [forward(unet, *inputs, t) for inputs, t in calls]

    same = [torch.equal(a, b) for a, b in zip(outputs("tome"), outputs("cis"))]
    assert same == [True, False, True, False, True, False]


# --- randomness, dtypes, layouts --------------------------------------------------------------


def test_seed_makes_identical_calls_identical(inputs):
    unet = sd15_unet()
    sample, context = inputs

    def call(t):  # keyword call, as some pipelines do
        with torch.no_grad():
            return unet(sample=sample, timestep=t, encoder_hidden_states=context).sample

    rng = torch.get_rng_state()
    sdmerge.apply(unet, "tome", r=0.5, seed=0)
    first = call(500)
    call(400)
    assert torch.equal(call(500), first)
    sdmerge.apply(unet, "tome", r=0.5, seed=0)
    assert torch.equal(call(500), first)
    sdmerge.apply(unet, "tome", r=0.5, seed=1)
    assert not torch.equal(call(500), first)
    sdmerge.apply(unet, "tome", r=0.5)  # seed=None: one generator keeps drawing, as tomesd
    assert not torch.equal(call(500), call(500))
    sdmerge.apply(unet, "tome", r=0.5, use_rand=False)
    assert torch.equal(call(500), call(500))
    assert torch.equal(torch.get_rng_state(), rng)  # apply never advances the global RNG


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_an_odd_batch(dtype):
    """A UNet batch of 3 in float16 / bfloat16: r=1 is exact, and each kind of grouping
    (bipartite, agglomerative, crucial; with importance from the previous call) stays close to
    the same method in float32."""
    sample, context = unet_inputs(batch=3)
    unet, reference = sd15_unet().to(dtype), sd15_unet()
    base = forward(unet, sample.to(dtype), context.to(dtype))
    sdmerge.apply(unet, "tome", r=1.0)
    assert torch.equal(forward(unet, sample.to(dtype), context.to(dtype)), base)
    for method in ("tome", "atc_average", "cis", "crucial"):
        options = {"use_rand": False} if method in BIPARTITE else {}
        sdmerge.apply(unet, method, r=0.5, **options)
        sdmerge.apply(reference, method, r=0.5, **options)
        for t in (900, 800) if METHODS[method].needs_importance else (900,):
            out = forward(unet, sample.to(dtype), context.to(dtype), t)
            expected = forward(reference, sample, context, t)
            assert out.dtype == dtype and torch.isfinite(out).all()
            error = (out.float() - expected).norm() / expected.norm()
            assert error < 0.02, (method, t, error.item())


def test_sdxl_layout_merges_its_first_attention_level(caplog):
    unet = sdxl_unet()
    sample, context = unet_inputs()
    conditions = sdxl_conditions()
    base = forward(unet, sample, context, added_cond_kwargs=conditions)
    tomesd.apply_patch(unet, ratio=0.5)  # tomesd's default merges no SDXL block
    torch.testing.assert_close(forward(unet, sample, context, added_cond_kwargs=conditions), base, atol=1e-6, rtol=0)
    tomesd.remove_patch(unet)

    with caplog.at_level(logging.INFO, logger="sdmerge.diffusion"):
        sdmerge.apply(unet, "tome", r=0.5)
    assert "down_blocks.1.attentions.0.transformer_blocks.0" in caplog.text  # says where
    assert merged_blocks(unet) == (
        "down_blocks.1.attentions.0.transformer_blocks.0",
        "down_blocks.1.attentions.1.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.0",
        "up_blocks.1.attentions.2.transformer_blocks.0",
    )
    assert (forward(unet, sample, context, added_cond_kwargs=conditions) - base).abs().max() > 1e-3
    sdmerge.apply(unet, "atc_average", r=0.5, max_downsample=2)  # level 2 too: every transformer block
    assert set(merged_blocks(unet)) == {name for name, _, _ in transformer_blocks_by_level(unet)}
    assert torch.isfinite(forward(unet, sample, context, added_cond_kwargs=conditions)).all()


# --- errors -----------------------------------------------------------------------------------


def test_bad_arguments_raise_clear_errors():
    unet = sd15_unet()
    with pytest.raises(ValueError, match="unknown method 'fast'.*tome, atc_single"):
        sdmerge.apply(unet, "fast")
    with pytest.raises(ValueError, match="for sd models"):
        sdmerge.apply(unet, "topk")
    for keep_rate in (0, -0.1, 1.5, "half", "0.5", True):
        with pytest.raises(ValueError, match="0 < r <= 1"):
            sdmerge.apply(unet, "tome", r=keep_rate)
    with pytest.raises(ValueError, match=r"2x2 stride keeps at least 1/4 = 0.25"):
        sdmerge.apply(unet, "cis", r=0.2)
    with pytest.raises(ValueError, match=r"3x3 stride keeps at least 1/9"):
        sdmerge.apply(unet, "tome", r=0.1, sx=3, sy=3)
    sdmerge.apply(unet, "tome", r=0.1, sx=4, sy=3)  # 1/12 <= 0.1: reachable
    with pytest.raises(ValueError, match="sx=4 does not apply to method 'atc_average'"):
        sdmerge.apply(unet, "atc_average", sx=4)
    with pytest.raises(ValueError, match="seed=3 does not apply to method 'crucial'"):
        sdmerge.apply(unet, "crucial", seed=3)
    with pytest.raises(ValueError, match="seed=1 has no effect with use_rand=False"):
        sdmerge.apply(unet, "tome", use_rand=False, seed=1)
    sdmerge.apply(unet, "atc_average", sx=2, use_rand=True)  # the defaults are fine
    with pytest.raises(TypeError, match=r"unknown option linkage for diffusion.*accepted options: max_downsample: .*"
                       r"sx: int >= 1 = 2; sy: int >= 1 = 2; use_rand: bool = True; seed"):
        sdmerge.apply(unet, "atc_average", linkage="average")
    with pytest.raises(TypeError, match="unknown option keep_rate"):  # r is apply's own argument
        sdmerge.apply(unet, "tome", keep_rate=0.5)
    with pytest.raises(TypeError, match="sx must be an int"):
        sdmerge.apply(unet, "tome", sx=2.0)
    with pytest.raises(TypeError, match="use_rand must be True or False"):
        sdmerge.apply(unet, "tome", use_rand="yes")
    with pytest.raises(ValueError, match="max_downsample=0"):
        sdmerge.apply(unet, "tome", max_downsample=0)
    with pytest.raises(ValueError, match="max_downsample=3 is not a power of two"):
        sdmerge.apply(unet, "tome", max_downsample=3)
    assert merged_blocks(unet) == SD15_MERGED  # failed calls left the last patch in place


def test_models_without_a_unet_are_rejected():
    supported = (
        r"builtins.object; supported: DiffusionPipeline \(with a UNet2DConditionModel\), "
        r"UNet2DConditionModel \(torch.compile'd or not\); StableDiffusion3Pipeline .*; "
        r"PixArtAlphaPipeline / PixArtSigmaPipeline, PixArtTransformer2DModel .*; ViTModel"
    )
    with pytest.raises(TypeError, match=supported):
        sdmerge.apply(object())
    with pytest.raises(TypeError, match="builtins.object"):
        sdmerge.remove(object())
    with pytest.raises(TypeError, match=r"its \.unet is a Linear, not a diffusers UNet2DConditionModel"):
        diffusion.apply(SimpleNamespace(unet=torch.nn.Linear(2, 2)))
    holder = SimpleNamespace(unet=sd15_unet())
    assert sdmerge.apply(holder, "tome") is holder
    assert merged_blocks(holder) == SD15_MERGED


def test_attention_that_cannot_be_merged_is_rejected():
    unet = sd15_unet()
    block = unet.get_submodule(SD15_MERGED[0])
    block.attn1.residual_connection = True
    with pytest.raises(ValueError, match=f"{SD15_MERGED[0]}.attn1: residual_connection=True"):
        sdmerge.apply(unet, "tome")
    assert merged_blocks(unet) == ()  # a failed apply leaves the UNet unpatched


def test_a_processor_with_weights_stays_in_the_module_tree(inputs):
    """An adapter's processor is an nn.Module with weights (IP-Adapter's are): sdmerge replaces no
    processor, so it stays a submodule (its weights move with .to(), are saved) and runs merged."""

    class ModuleProcessor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.token_counts = []

        def __call__(self, attn, hidden_states, *args, **kwargs):
            self.token_counts.append(hidden_states.shape[1])
            return self.scale * AttnProcessor2_0()(attn, hidden_states, *args, **kwargs)

    unet = sd15_unet()
    block = unet.get_submodule(SD15_MERGED[0])
    for attn in (block.attn1, block.attn2):
        attn.set_processor(ModuleProcessor())
    parameters = {name for name, _ in unet.named_parameters()}
    sdmerge.apply(unet, "cis", r=0.5, merge_crossattn=True)
    assert {name for name, _ in unet.named_parameters()} == parameters
    forward(unet, *inputs, t=900)
    forward(unet, *inputs, t=800)
    assert block.attn1.processor.token_counts == [128, 128] and block.attn2.processor.token_counts == [128, 128]


def test_a_block_or_attention_called_outside_a_model_call_runs_unmerged(inputs, caplog):
    unet = sd15_unet()
    block = unet.get_submodule(SD15_MERGED[0])
    x = torch.randn(2, 256, block.attn1.query_dim)
    with torch.no_grad():
        expected_attention, expected_block = block.attn1(x), block(x, encoder_hidden_states=inputs[1])
    sdmerge.apply(unet, "atc_average", r=0.5)
    with caplog.at_level(logging.WARNING, logger="sdmerge.diffusion"), torch.no_grad():
        assert torch.equal(block.attn1(x), expected_attention)
        assert torch.equal(block(x, encoder_hidden_states=inputs[1]), expected_block)
    assert caplog.text.count("attn1 ran outside a call of the patched model, so it ran unmerged") == 1
    assert not torch.equal(forward(unet, *inputs), forward(sd15_unet(), *inputs))  # merged in a UNet call


def test_a_self_attention_mask_is_an_error(inputs):
    unet = sd15_unet()
    sdmerge.apply(unet, "atc_average", r=0.5)
    with pytest.raises(ValueError, match=f"{SD15_MERGED[0]}.attn1 got a self-attention mask"):
        forward(unet, *inputs, attention_mask=torch.ones(2, 256))
