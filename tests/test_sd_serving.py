"""Serving and training: threads sharing a patched model, generation boundaries, gradient
checkpointing, IP-Adapter, and a timestep_range that never merges."""

from __future__ import annotations

import copy
import gc
import logging
import threading

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
)

import sdmerge
from sdmerge.diffusion import pipeline_calls
from sdmerge.methods import METHODS
from tests.test_stable_diffusion import forward
from tests.tiny_diffusers import CONTEXT_DIM, SD_METHODS, sd15_unet, tiny_pipeline, unet_inputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BIPARTITE = tuple(name for name in SD_METHODS if METHODS[name].needs_split)


def options(method: str, **extra) -> dict:
    """Reproducible options: the bipartite methods' split seeded."""
    return {**({"seed": 0} if method in BIPARTITE else {}), **extra}


def run_threads(work, count: int, barrier: threading.Barrier | None = None):
    """Run ``work(i)`` in ``count`` threads at once; their results, in order (errors re-raised).
    A thread that fails breaks ``barrier``, so that the others stop waiting for it."""
    results, errors = [None] * count, []

    def target(i):
        try:
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            errors.append(error)
            if barrier is not None:
                barrier.abort()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results


# --- 1. threads ------------------------------------------------------------------------------------


CONFIGS = [(method, options(method)) for method in SD_METHODS] + [
    ("atc_average", {"plan_every": 2, "share_plans": True}),
    ("cis", {"seed": 0, "plan_every": 2, "merge_crossattn": True, "merge_mlp": True}),
    ("tome", {"use_rand": False, "kv_only": True, "timestep_range": (0, 850)}),
]


@pytest.mark.parametrize("method, config", CONFIGS, ids=lambda value: str(value))
def test_threads_calling_one_unet_get_the_serial_outputs(method, config):
    """Three threads, each running two generations on one patched UNet, with a barrier before every
    call so that the calls really overlap: the outputs equal the same calls run one after another."""
    unet = sd15_unet()
    sdmerge.apply(unet, method, r=0.5, **config)
    inputs = [unet_inputs(batch=2, seed=10 + i) for i in range(3)]
    timesteps = (900, 800, 700, 950, 850)  # 950: a second generation (the timestep rises)

    def generation(i, barrier=None):
        outputs = []
        for t in timesteps:
            if barrier is not None:
                barrier.wait(timeout=120)
            outputs.append(forward(unet, *inputs[i], t))
        return outputs

    serial = [generation(i) for i in range(3)]
    sdmerge.apply(unet, method, r=0.5, **config)  # a fresh patch, as the serial run had
    barrier = threading.Barrier(3)
    concurrent = run_threads(lambda i: generation(i, barrier), 3, barrier)
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(concurrent[i], serial[i])), (method, i)


@pytest.mark.parametrize("method", [None, "cis", "crucial", "atc_average"])
def test_threads_calling_one_pipeline_or_two_pipelines_sharing_the_unet(method):
    """Three threads share one txt2img pipeline, three more an img2img pipeline made from its
    components (the UNet, text encoder, VAE) with a scheduler of its own. Two things of diffusers
    and transformers race even unpatched, so the harness keeps them out of the threads: a scheduler
    shared by two kinds of pipeline (it keeps the state of the call that set its timesteps last),
    and the tokenizer (a fast tokenizer sets its padding and truncation on the shared object at
    every call): the prompts are encoded first. ``None``: the unpatched pipelines, the harness's
    own check."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    twin = StableDiffusionImg2ImgPipeline(**{**pipe.components, "scheduler": copy.deepcopy(pipe.scheduler)})
    twin.set_progress_bar_config(disable=True)
    if method is not None:
        sdmerge.apply(pipe, method, r=0.5, **options(method, plan_every=2))
    with torch.no_grad():
        prompts = [pipe.encode_prompt(text, "cpu", 1, True) for text in ("a red cat", "a blue dog", "a green bird")]

    def generate(i, pipeline=pipe):
        positive, negative = prompts[i]
        call = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(i), output_type="pt",
                    prompt_embeds=positive, negative_prompt_embeds=negative)
        if isinstance(pipeline, StableDiffusionImg2ImgPipeline):
            image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i))
            return pipeline(image=image, strength=0.9, **call).images
        return pipeline(height=32, width=32, **call).images

    serial = [generate(i) for i in range(3)] + [generate(i, twin) for i in range(3)]
    for _ in range(2):
        concurrent = run_threads(lambda i: generate(i % 3, pipe if i < 3 else twin), 6)
        assert all(torch.equal(a, b) for a, b in zip(concurrent, serial)), method


# --- 2. generation boundaries ------------------------------------------------------------------------


SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_identical_pipeline_calls_give_identical_images(scheduler, steps):
    """Every method, one-step models included (every call at one timestep: the timestep rule saw no
    boundary, so cis and crucial carried the previous image's prompt mass)."""
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(pipe.scheduler.config)  # after apply too: any scheduler
    for method in SD_METHODS:
        sdmerge.apply(pipe, method, r=0.5, **options(method, plan_every=2))
        images = [
            pipe("a cat", height=32, width=32, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
            for _ in range(2)
        ]
        assert torch.equal(*images), (method, scheduler, steps)


@pytest.mark.parametrize("method", ["cis", "crucial", "tome"])
def test_img2img_after_an_interrupted_generation_starts_its_own(method):
    """txt2img interrupted after its first step, then a low-strength img2img on the same UNet (a
    pipeline made after apply): the img2img reuses nothing of the interrupted run (plans, prompt
    mass) and equals the img2img of a freshly patched UNet."""
    config = options(method, plan_every=3)
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def img2img():
        img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)  # made after apply: shares the patched UNet
        img2img.set_progress_bar_config(disable=True)
        return img2img("a dog", image=image, strength=0.3, num_inference_steps=10,
                       generator=torch.Generator().manual_seed(1), output_type="pt").images

    sdmerge.apply(pipe, method, r=0.5, **config)
    expected = img2img()

    def interrupt(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return callback_kwargs

    sdmerge.apply(pipe, method, r=0.5, **config)
    pipe("a cat", height=32, width=32, num_inference_steps=10, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=interrupt, output_type="pt")
    assert torch.equal(img2img(), expected)


def test_new_generation_marks_a_boundary_for_a_bare_unet():
    """One-step calls at one timestep: the timestep rule sees one generation (cis weighs the second
    call by the first one's prompt mass); sdmerge.new_generation marks each call as its own."""
    unet = sd15_unet()
    inputs = unet_inputs()
    sdmerge.apply(unet, "cis", r=0.5, seed=0)
    first, second = forward(unet, *inputs, 999), forward(unet, *inputs, 999)
    assert not torch.equal(first, second)  # the rule: one generation
    sdmerge.apply(unet, "cis", r=0.5, seed=0)
    marked = []
    for _ in range(2):
        sdmerge.new_generation(unet)
        marked.append(forward(unet, *inputs, 999))
    assert torch.equal(marked[0], first) and torch.equal(marked[1], first)
    with pytest.raises(ValueError, match="not patched by sdmerge"):
        sdmerge.new_generation(sd15_unet())


def test_a_marked_generation_turns_the_timestep_rule_off():
    """Inside a marked generation a rising timestep is not a boundary (a sampler that goes back up);
    outside one it is."""
    unet = sd15_unet()
    inputs = unet_inputs()
    calls = (900, 800, 950)
    sdmerge.apply(unet, "cis", r=0.5, seed=0)
    by_rule = [forward(unet, *inputs, t) for t in calls]
    sdmerge.apply(unet, "cis", r=0.5, seed=0)
    sdmerge.new_generation(unet)
    marked = [forward(unet, *inputs, t) for t in calls]
    assert torch.equal(marked[0], by_rule[0]) and torch.equal(marked[1], by_rule[1])
    assert not torch.equal(marked[2], by_rule[2])  # by the rule the third call started a generation


def test_pipeline_calls_restore_diffusers_progress_bar_when_the_last_patch_goes():
    from diffusers import DiffusionPipeline

    gc.collect()  # patched models of earlier tests, now unreachable, leave the registry
    assert not pipeline_calls._watched
    original = pipeline_calls._original_progress_bar or DiffusionPipeline.progress_bar
    assert original.__module__ == "diffusers.pipelines.pipeline_utils"
    unets = [sd15_unet(), sd15_unet()]
    for unet in unets:
        sdmerge.apply(unet, "tome")
    assert DiffusionPipeline.progress_bar is not original
    sdmerge.remove(unets[0])
    assert DiffusionPipeline.progress_bar is not original
    sdmerge.remove(unets[1])
    assert DiffusionPipeline.progress_bar is original


# --- 3. gradient checkpointing -----------------------------------------------------------------------


def gradients(method: str, checkpointing: bool, train: bool) -> dict[str, torch.Tensor]:
    """Gradients of a loss on the second of two UNet calls (the first gives cis / crucial their
    prompt mass; in train mode each call is its own generation) with respect to the parameters of
    the merged blocks and the sample."""
    unet = sd15_unet()
    unet.train(train)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(3)  # the unseeded split's generator is forked from the global RNG at apply
    sdmerge.apply(unet, method, r=0.5, merge_mlp=True)
    sample, context = unet_inputs()
    sample.requires_grad_(True)
    with torch.no_grad():
        unet(sample, 900, context)
    loss = unet(sample, 800, context).sample.square().mean()
    loss.backward()
    grads = {name: p.grad for name, p in unet.named_parameters() if name.startswith("down_blocks.0.attentions")}
    return {"sample": sample.grad, **grads}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", SD_METHODS)
def test_gradient_checkpointing_recomputes_the_forward_merge(method, train):
    """The checkpointed blocks run again in the backward pass and must merge as the forward did
    (the default unseeded split, the prompt mass): the same gradients with and without it."""
    expected = gradients(method, checkpointing=False, train=train)
    got = gradients(method, checkpointing=True, train=train)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)


# --- 4. IP-Adapter -------------------------------------------------------------------------------------


IMAGE_EMBEDDING = 8  # the tiny IP-Adapter's image embedding width


def tiny_ip_adapter(unet) -> dict:
    """An IP-Adapter state dict for ``unet`` (random weights, 4 image tokens), in the layout
    ``load_ip_adapter`` reads: ``image_proj`` (an ``ImageProjection``) and ``ip_adapter`` (the
    ``to_k_ip`` / ``to_v_ip`` of every cross-attention, numbered 1, 3, 5, ... in processor order)."""
    generator = torch.Generator().manual_seed(7)
    tokens = 4
    ip_adapter, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name.removesuffix(".processor")).to_q.out_features
            for part in ("to_k_ip", "to_v_ip"):
                ip_adapter[f"{key}.{part}.weight"] = torch.randn(width, CONTEXT_DIM, generator=generator) * 0.1
            key += 2
    image_proj = {
        "proj.weight": torch.randn(tokens * CONTEXT_DIM, IMAGE_EMBEDDING, generator=generator) * 0.1,
        "proj.bias": torch.zeros(tokens * CONTEXT_DIM),
        "norm.weight": torch.ones(CONTEXT_DIM),
        "norm.bias": torch.zeros(CONTEXT_DIM),
    }
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


@pytest.mark.parametrize("method", ["tome", "cis"])
def test_ip_adapter_loaded_and_unloaded_while_patched_keeps_merging(method):
    """load_ip_adapter rebuilds every processor (diffusers calls ``type(processor)()``) and
    unload_ip_adapter again: sdmerge's hooks are on the attention modules, so merging stays, with
    and without the adapter, and equals applying after loading."""
    config = options(method)

    def generate(pipeline, with_adapter: bool):
        extra = {"ip_adapter_image_embeds": [torch.randn(2, 1, IMAGE_EMBEDDING, generator=torch.Generator().manual_seed(2))]}
        return pipeline("a cat", height=32, width=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        output_type="pt", **(extra if with_adapter else {})).images

    reference = tiny_pipeline()
    reference.set_progress_bar_config(disable=True)
    plain = generate(reference, False)
    reference.load_ip_adapter(tiny_ip_adapter(reference.unet), subfolder="", weight_name="", image_encoder_folder=None)
    unmerged_adapter = generate(reference, True)
    sdmerge.apply(reference, method, r=0.5, **config)
    merged_adapter = generate(reference, True)
    assert not torch.equal(merged_adapter, unmerged_adapter)

    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    sdmerge.apply(pipe, method, r=0.5, **config)
    merged = generate(pipe, False)
    pipe.load_ip_adapter(tiny_ip_adapter(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)
    assert torch.equal(generate(pipe, True), merged_adapter)
    pipe.unload_ip_adapter()
    assert torch.equal(generate(pipe, False), merged)
    sdmerge.remove(pipe)
    assert torch.equal(generate(pipe, False), plain)


# --- 6. a timestep_range that never merges -------------------------------------------------------------


def test_a_timestep_range_that_merges_no_call_is_reported_once_per_generation(caplog):
    pipe = tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="sdmerge.diffusion"):
        sdmerge.apply(pipe, "tome", r=0.5, timestep_range=(0.3, 1.0))  # fractions, as some UIs write them
    assert "merges only model calls at timesteps 0.3 <= t <= 1 of the scheduler's 0 .. 999" in caplog.text
    assert "not fractions of the steps" in caplog.text
    caplog.clear()
    sdmerge.apply(pipe, "tome", r=0.5, timestep_range=(0.3, 0.9))  # no integer timestep in it
    with caplog.at_level(logging.WARNING, logger="sdmerge.diffusion"):
        for _ in range(2):
            pipe("a cat", height=32, width=32, num_inference_steps=3, output_type="pt")
    reports = [r.getMessage() for r in caplog.records if "merged none of the" in r.getMessage()]
    assert len(reports) == 2  # one per pipeline call, at its end
    assert "timestep_range=(0.3, 0.9) merged none of the 3 model calls" in reports[0]
    assert "scheduler's timestep units" in reports[0] and "not fractions" in reports[0]
    caplog.clear()
    sdmerge.apply(pipe, "tome", r=0.5, timestep_range=(500, 1000))
    with caplog.at_level(logging.WARNING, logger="sdmerge.diffusion"):
        pipe("a cat", height=32, width=32, num_inference_steps=3, output_type="pt")
    assert not [r for r in caplog.records if "merged none of the" in r.getMessage()]  # some calls merged


def test_a_bare_unet_reports_a_generation_that_merged_nothing_when_the_next_starts(caplog):
    unet = sd15_unet()
    inputs = unet_inputs()
    sdmerge.apply(unet, "tome", r=0.5, timestep_range=(0.3, 1.0))
    with caplog.at_level(logging.WARNING, logger="sdmerge.diffusion"):
        for t in (900, 800, 950):  # 950: a new generation, which ends the first
            forward(unet, *inputs, t)
    reports = [r.getMessage() for r in caplog.records if "merged none of the" in r.getMessage()]
    assert len(reports) == 1 and "none of the 2 model calls" in reports[0] and "from 900 to 800" in reports[0]
