"""Benchmark: diffusion transformers (SD3-Medium, PixArt-Sigma, FLUX.1-dev) at their real widths,
merged and unmerged, against the bound of their counted FLOPs (issues 21 and 22).

What is timed: model calls of a bare ``SD3Transformer2DModel`` / ``PixArtTransformer2DModel``
with random weights from the released models' configs (SD3-Medium: 24 joint blocks, width 1536,
24 heads, 333 prompt tokens = 77 CLIP + 256 T5; PixArt-Sigma: 28 blocks, width 1152, 16 heads,
a 300-token T5 prompt through cross-attention; FLUX.1-dev: 19 double-stream and 38 single-stream
blocks, width 3072, 24 heads, 512 T5 prompt tokens, batch 1 (guidance distilled: no classifier-free
guidance batch)), built with fewer blocks (``--blocks-at-real-width``, default 4, Flux's split over
its two stacks: 2 + 2): the first and the last block, which sdmerge leaves unmerged by default, and
the blocks between them, which it merges. Each arm runs a generation of
``--calls`` consecutive calls (default 5) at the timesteps of the model's pipeline scheduler
(SD3: flow-matching Euler, shift 3, 28 steps: 1000, 987, 974, ...; PixArt-Sigma: DPM-Solver++
with diffusers' default betas, 20 steps: 999, 949, ...; FLUX.1-dev: flow-matching Euler with
the pipeline's resolution-dependent shift, 28 steps), each call's latent the scheduler's step
from the previous output, so that ``plan_every`` reuses plans as in a pipeline; a figure per call
is the generation's time divided by its calls (the planning call and the reusing calls together).

Arms (:func:`arms`): unpatched; ``tome`` r=0.5 (self-attention only); ``tome`` r=0.5 with
``merge_mlp``; ``grid`` r=0.25 with ``kv_only``; ``atc_average`` r=0.5 with ``share_plans=True,
plan_every=5``; on request (``--arms``) ``tome`` r=0.5 with ``merge_mlp`` and ``share_plans`` (one
bipartite matching per call instead of one per merged block). Flux adds a diffusers cache whose
skipping does not depend on the (random) weights, alone and on top of ``tome`` with ``merge_mlp``
and ``grid`` with ``kv_only`` (:data:`CACHES`; their state reset at the start of each generation):
pyramid attention broadcast (PAB), every self-attention's output replayed in every second call;
TaylorSeer in its lite mode, every block skipped and the output projection's output predicted
(first order) in every second call after the first (``cache_interval=2``,
``disable_cache_before_step=1``: calls 1, 3, 5 compute, as with PAB). PAB and merging save the
same attention work, so their speed-ups overlap; a cache that skips whole blocks leaves the
merging its whole share of the calls it computes.
Each repetition runs every arm once, in turn (interleaved; repetition ``i`` starts with arm ``i``,
so that a drift of the machine's speed does not always fall on the same arms), after one untimed
unpatched call at the benchmark's size and one untimed call of every arm on a small latent;
ratios are paired: the median of the per-repetition ratios, with their range. Both clocks are
read around every timed region: wall (elapsed) and this process's CPU time (all its threads;
other jobs on a shared machine disturb it less, but OpenMP threads that spin while waiting count).

Columns:

- s/call: the median seconds per model call of the measured (``n``-block) model;
- speed-up: unpatched time over the arm's, paired per repetition (higher is faster), of the
  measured model and of the scaled full step (below), beside the bound from counted FLOPs
  (``dit_flops.py``: unpatched FLOPs over merged FLOPs, with the first and last blocks unmerged);
- plan share, merge/unmerge share: the part of the measured call spent computing plans
  (``MergedBlock._plan``: grouping, clustering, plan reuse look-ups) and applying them
  (``MergePlan.merge`` / ``unmerge``), timed by ``bench_unet.OverheadTimer``.

Scaling to the full model (24 blocks for SD3-Medium, 28 for PixArt-Sigma, all but the first and
the last merged), per generation, from the times of each block of every call (read by forward
hooks on the blocks, the device synchronised around each; :class:`BlockClock`)::

    step = outside + first + last + (D - 2) / m * sum(middle - plans) + k * plans

``outside``: the call minus its blocks (patch embedding, prompt projection, timestep embedding,
final layer, the scheduler's step); ``first``, ``last``: those blocks; ``middle``: the ``m = n - 2``
blocks between them; ``plans``: the plan time inside those blocks; ``k = (D - 2) / m`` when every
merged block computes its own plan, ``k = 1`` with ``share_plans`` (one plan per call for the
whole model, whatever its depth). Flux scales each stack on its own: its measured middle
double-stream blocks stand for 18, its single-stream ones for 37 (:meth:`Run.scaled_step`). The
second table gives these parts per arm. The goals of the issues (SD3 and Flux at 1024x1024) are
checked below the tables, with, for Flux, whether a cache's speed-up and the merging's multiply
(within 10 %) when both run.

    PYTHONPATH=. python scripts/bench_dit.py --quick        # tiny widths, seconds: checks the script
    PYTHONPATH=. python scripts/bench_dit.py --models sd3 --resolutions 1024 512 --repetitions 3 --threads 2
    PYTHONPATH=. python scripts/bench_dit.py --models flux --resolutions 1024 512 --repetitions 3 --threads 2
    PYTHONPATH=. python scripts/bench_dit.py --device cuda --dtype float16 --blocks-at-real-width 24

(``PYTHONPATH=.``: this checkout's ``sdmerge``, not an installed one; the report names the one used.)

Importable (``scripts/`` on ``sys.path``): :data:`MODELS`, :func:`build`, :func:`arms`,
:func:`run_resolution`, :func:`markdown`, :func:`goal_lines`, :class:`BlockClock`, :class:`Arm`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    PixArtTransformer2DModel,
    PyramidAttentionBroadcastConfig,
    SD3Transformer2DModel,
    TaylorSeerCacheConfig,
)

import bench_unet
import dit_flops
import sdmerge
from bench_unet import OverheadTimer, Setting, paired_ratio, synchronize

SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
PIXART_SIGMA = dict(  # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json
    sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=28, attention_head_dim=72,
    num_attention_heads=16, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False,
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_SCHEDULER = dict(  # FLUX.1-dev, scheduler/scheduler_config.json
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
QUICK_SIDE = 128  # --quick: 128x128 pixels, a 16x16 latent, 8x8 = 64 image tokens


def _sd3_inputs(config: dict, batch: int, latent: int, text: int, generator: torch.Generator) -> dict:
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], latent, latent, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=generator),
    }


def _flux_inputs(config: dict, batch: int, latent: int, text: int, generator: torch.Generator) -> dict:
    """As FluxPipeline makes them (without importing the pipelines, which import transformers'
    image processors): the ``latent x latent`` latent packed 2x2 pixels per token, row-major
    (``hidden_states [B, (latent / 2)^2, in_channels]``), ``img_ids`` ``(0, row, column)``, a
    guidance of 3.5 (FLUX.1-dev's default; no classifier-free guidance batch)."""
    side = latent // 2
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return {
        "hidden_states": torch.randn(batch, side * side, config["in_channels"], generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=generator),
        "img_ids": torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float(),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 3.5),
    }


def _flux_timesteps(scheduler, steps: int, tokens: int, device) -> None:
    """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by ``mu``, linear in the image tokens
    from ``base_shift`` at ``base_image_seq_len`` to ``max_shift`` at ``max_image_seq_len``
    (diffusers' ``calculate_shift``)."""
    c = scheduler.config
    mu = c.base_shift + (c.max_shift - c.base_shift) * (tokens - c.base_image_seq_len) / (
        c.max_image_seq_len - c.base_image_seq_len
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device=device)


def _default_timesteps(scheduler, steps: int, tokens: int, device) -> None:
    scheduler.set_timesteps(steps, device=device)


def _batch_timestep(t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """The scheduler's timestep ``[]`` for each sample ``[B]``, as the SD3 and PixArt pipelines pass it."""
    return t.expand(sample.shape[0])


def _flux_timestep(t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """As FluxPipeline passes it: ``t / 1000`` ``[B]`` in the latents' dtype."""
    return (t / 1000).expand(sample.shape[0]).to(sample.dtype)


def _pixart_inputs(config: dict, batch: int, latent: int, text: int, generator: torch.Generator) -> dict:
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], latent, latent, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, config["caption_channels"], generator=generator),
        "encoder_attention_mask": torch.ones(batch, text),  # as the pipeline passes it (1: a kept token)
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


@dataclass(frozen=True)
class DitModel:
    """One benchmarked model: its diffusers class and config, prompt length, pipeline scheduler.

    ``stacks``: its blocks, one ``(attribute, config key of their number)`` per stack, in the
    order they run (Flux: the double-stream, then the single-stream blocks); the model's first
    block (of its first stack) and last block (of its last stack) are left unmerged."""

    title: str
    family: str  # dit_flops.ModelShape.family
    model_class: type
    config: dict
    tiny: dict  # --quick: the config's widths replaced by these
    text_tokens: int
    make_inputs: Callable[[dict, int, int, int, torch.Generator], dict]
    scheduler: Callable[[], object]
    steps: int  # the pipeline's default num_inference_steps
    stacks: tuple[tuple[str, str], ...] = (("transformer_blocks", "num_layers"),)
    set_timesteps: Callable = _default_timesteps  # (scheduler, steps, image tokens, device)
    timestep: Callable = _batch_timestep  # (scheduler timestep, sample) -> the model's timestep argument
    batch: int = 2  # a model call's batch for one prompt: 2 with classifier-free guidance, FLUX.1-dev 1

    def model_config(self, blocks: int | None = None, quick: bool = False) -> dict:
        """The config to build: ``blocks`` blocks (default: the released depth), split evenly over
        the stacks (the first ones get one more), tiny widths with ``quick``."""
        counts = self.depths if blocks is None else self.split(blocks)
        return {**self.config, **(self.tiny if quick else {}), **{key: n for (_, key), n in zip(self.stacks, counts)}}

    def split(self, blocks: int) -> tuple[int, ...]:
        """``blocks`` measured blocks over the stacks."""
        share, extra = divmod(blocks, len(self.stacks))
        return tuple(share + (i < extra) for i in range(len(self.stacks)))

    @property
    def depths(self) -> tuple[int, ...]:
        """The released number of blocks of each stack."""
        return tuple(self.config[key] for _, key in self.stacks)

    @property
    def depth(self) -> int:
        return sum(self.depths)

    def blocks(self, model) -> list:
        """The model's blocks, the stacks' in turn."""
        return [block for attribute, _ in self.stacks for block in getattr(model, attribute)]

    def counts(self, model) -> tuple[int, ...]:
        """How many blocks of each stack ``model`` has."""
        return tuple(len(getattr(model, attribute)) for attribute, _ in self.stacks)

    def shape(self, blocks: int | None = None, quick: bool = False) -> dit_flops.ModelShape:
        return dit_flops.ModelShape.from_config(self.family, self.model_config(blocks, quick), self.text_tokens)


MODELS = {
    "sd3": DitModel(
        "SD3-Medium", "sd3", SD3Transformer2DModel, SD3_MEDIUM,
        dict(attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
             pooled_projection_dim=32),
        333, _sd3_inputs, lambda: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), 28,
    ),
    "pixart": DitModel(
        "PixArt-Sigma", "pixart", PixArtTransformer2DModel, PIXART_SIGMA,
        dict(attention_head_dim=8, num_attention_heads=2, cross_attention_dim=16, caption_channels=32),
        300, _pixart_inputs, DPMSolverMultistepScheduler, 20,
    ),
    "flux": DitModel(
        "FLUX.1-dev", "flux", FluxTransformer2DModel, FLUX_DEV,
        dict(attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
             axes_dims_rope=(4, 6, 6)),
        512, _flux_inputs, lambda: FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), 28,
        stacks=(("transformer_blocks", "num_layers"), ("single_transformer_blocks", "num_single_layers")),
        set_timesteps=_flux_timesteps, timestep=_flux_timestep, batch=1,
    ),
}

CPU, WALL = 0, 1  # the two readings of both_clocks()
CLOCK_INDEX = {"cpu": CPU, "wall": WALL}


def both_clocks() -> np.ndarray:
    """``[this process's CPU time, elapsed time]`` in seconds: differences of two readings time a
    region on both clocks at once (``OverheadTimer`` accumulates them as it would floats)."""
    return np.array([time.process_time(), time.perf_counter()])


def _pair(seconds) -> np.ndarray:
    """``OverheadTimer`` seconds as a pair (a timer that timed nothing holds the float ``0.0``)."""
    return np.zeros(2) + seconds


@dataclass
class Run:
    """One timed generation of one arm: ``[cpu, wall]`` seconds of the whole generation, of each
    block (``blocks[i]``) and of the plans computed inside each block, plan and merge/unmerge
    seconds, the plans computed, and the measured blocks of each stack (``None``: one stack)."""

    calls: int
    seconds: np.ndarray
    blocks: np.ndarray  # [n, 2]
    block_plans: np.ndarray  # [n, 2]
    plan: np.ndarray
    merging: np.ndarray
    plans: int
    stacks: list[int] | None = None

    def _middles(self, depths) -> list[tuple[slice, float]]:
        """Per stack, its measured blocks between the model's first and last one, and how many
        blocks of a model with ``depths`` blocks per stack (an ``int``: one stack) each stands for."""
        counts = [len(self.blocks)] if self.stacks is None else list(self.stacks)
        depths = [depths] if isinstance(depths, int) else list(depths)
        middles, start = [], 0
        for index, (count, depth) in enumerate(zip(counts, depths, strict=True)):
            first, last = index == 0, index == len(counts) - 1  # this stack holds the model's first / last block
            middles.append((slice(start + first, start + count - last), (depth - first - last) / (count - first - last)))
            start += count
        return middles

    def scaled_plans(self, depths, shares_plans: bool) -> np.ndarray:
        """``[cpu, wall]`` plan seconds per call in a model of ``depths`` blocks (module docstring)."""
        plans = self.block_plans
        return sum((1 if shares_plans else scale) * plans[middle].sum(axis=0) for middle, scale in self._middles(depths))

    def scaled_step(self, depths, shares_plans: bool) -> np.ndarray:
        """``[cpu, wall]`` seconds per call of the same arm in a model of ``depths`` blocks per
        stack (an ``int``: one stack; module docstring)."""
        blocks, plans = self.blocks, self.block_plans
        outside = self.seconds - blocks.sum(axis=0)
        work = sum(scale * (blocks[middle] - plans[middle]).sum(axis=0) for middle, scale in self._middles(depths))
        return (outside + blocks[0] + blocks[-1] + work + self.scaled_plans(depths, shares_plans)) / self.calls


@dataclass
class Arm(Setting):
    """One arm (``bench_unet.Setting``: its label and how it patches the model) with its timed
    generations (:class:`Run`), one per repetition."""

    cache: str | None = None  # a diffusers cache enabled after the merging (a key of CACHES)
    runs: list[Run] = field(default_factory=list)
    pending: Run | None = None  # the run being recorded (set by the timed function)

    def patch(self, model) -> None:
        if getattr(model, "is_cache_enabled", False):
            model.disable_cache()
        super().patch(model)
        if self.cache is not None:
            model.enable_cache(CACHES[self.cache]())

    def record(self, seconds: float, timer: OverheadTimer) -> None:
        super().record(seconds, timer)
        self.runs.append(self.pending)

    def per_call(self, clock: int) -> list[float]:
        return [run.seconds[clock] / run.calls for run in self.runs]

    def steps(self, depths, clock: int) -> list[float]:
        shares = self.options.get("share_plans", False)
        return [run.scaled_step(depths, shares)[clock] for run in self.runs]


CURRENT_TIMESTEP = [None]  # the scheduler timestep of the call being timed, for a cache that asks for it

CACHES = {  # diffusers caches whose skipping does not depend on the (random) weights
    # pyramid attention broadcast: every self-attention output reused in every second call, at any timestep
    "pab": lambda: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: CURRENT_TIMESTEP[0],
    ),
    # TaylorSeer lite: in every second call after the first, every block skipped and proj_out predicted
    "taylorseer_lite": lambda: TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, use_lite_mode=True),
}

ARMS = {  # name: (label, method, keep rate, options[, cache]); the arms, unpatched first
    "unpatched": ("unpatched", None, None, {}),
    "tome": ("tome r=0.5", "tome", 0.5, {}),
    "tome_mlp": ("tome r=0.5, merge_mlp", "tome", 0.5, {"merge_mlp": True}),
    "grid_kv": ("grid r=0.25, kv_only", "grid", 0.25, {"kv_only": True}),
    "atc_reuse": ("atc_average r=0.5, share_plans, plan_every=5", "atc_average", 0.5,
                  {"share_plans": True, "plan_every": 5}),
}
CACHE_ARMS = {  # Flux (issue 22): a cache alone and on top of the merging
    "pab": ("PAB", None, None, {}, "pab"),
    "pab_tome_mlp": ("PAB + tome r=0.5, merge_mlp", "tome", 0.5, {"merge_mlp": True}, "pab"),
    "pab_grid_kv": ("PAB + grid r=0.25, kv_only", "grid", 0.25, {"kv_only": True}, "pab"),
    "taylorseer": ("TaylorSeer lite", None, None, {}, "taylorseer_lite"),
    "taylorseer_tome_mlp": ("TaylorSeer lite + tome r=0.5, merge_mlp", "tome", 0.5, {"merge_mlp": True},
                            "taylorseer_lite"),
    "taylorseer_grid_kv": ("TaylorSeer lite + grid r=0.25, kv_only", "grid", 0.25, {"kv_only": True},
                           "taylorseer_lite"),
}
EXTRA_ARMS = {  # on request (--arms): what the arms suggest trying
    "tome_mlp_shared": ("tome r=0.5, merge_mlp, share_plans", "tome", 0.5, {"merge_mlp": True, "share_plans": True}),
    **CACHE_ARMS,
}
DEFAULT_ARMS = {"sd3": tuple(ARMS), "pixart": tuple(ARMS), "flux": (*ARMS, *CACHE_ARMS)}
GOALS = {  # speed-ups of a full step at 1024x1024 on the CPU: issue 21 (SD3-Medium), issue 22 (FLUX.1-dev)
    ("sd3", 1024): {"tome r=0.5, merge_mlp": 1.75, "grid r=0.25, kv_only": 1.3,
                    "atc_average r=0.5, share_plans, plan_every=5": 1.35},
    ("flux", 1024): {"tome r=0.5, merge_mlp": 1.6, "grid r=0.25, kv_only": 1.2},
}
MULTIPLY_WITHIN = 0.10  # issue 22: a cache on top of the merging: the two speed-ups multiply within 10 %


def arms(names=tuple(ARMS)) -> list[Arm]:
    """Fresh arms (they keep their runs) of ``names`` (keys of :data:`ARMS` / :data:`EXTRA_ARMS`),
    the unpatched one first, whether named or not."""
    catalog = {**ARMS, **EXTRA_ARMS}
    names = ["unpatched"] + [name for name in names if name != "unpatched"]
    return [Arm(label, "none" if method is None else "sdmerge", method, r, dict(options), cache=cache)
            for label, method, r, options, cache in ((*catalog[name], None)[:5] for name in names)]


class BlockClock:
    """``[cpu, wall]`` seconds spent in each of ``blocks`` (forward hooks, the device synchronised
    around each block), and the part of them ``timer`` counted as plans."""

    def __init__(self, blocks: list, timer: OverheadTimer):
        self.blocks = list(blocks)
        self.timer = timer
        self.reset()

    def reset(self) -> None:
        self.seconds = np.zeros((len(self.blocks), 2))
        self.plans = np.zeros((len(self.blocks), 2))
        self._started = None

    def _enter(self, index: int, module, args) -> None:
        synchronize(self.timer.device)
        self._started = (self.timer.clock(), _pair(self.timer.seconds["plan"]))

    def _exit(self, index: int, module, args, output) -> None:
        synchronize(self.timer.device)
        start, plan = self._started
        self.seconds[index] += self.timer.clock() - start
        self.plans[index] += _pair(self.timer.seconds["plan"]) - plan

    @contextlib.contextmanager
    def installed(self):
        handles = []
        for index, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(functools.partial(self._enter, index)))
            handles.append(block.register_forward_hook(functools.partial(self._exit, index)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


def build(spec: DitModel, blocks: int | None, quick: bool, dtype: torch.dtype, device: torch.device):
    """The transformer with ``blocks`` blocks (default: all), random weights (seed 0), made on
    ``device`` (FLUX.1-dev's 12B parameters are initialised much faster on a GPU)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = spec.model_class(**spec.model_config(blocks, quick)).eval()
    return model if dtype == torch.float32 else model.to(dtype)  # diffusers warns about any to(dtype=...)


def make_inputs(spec: DitModel, model, side: int, batch: int, dtype, device) -> dict:
    """The model's keyword arguments but the timestep, for ``side x side`` pixels (latent ``side / 8``)."""
    generator = torch.Generator().manual_seed(side)
    inputs = spec.make_inputs(model.config, batch, side // 8, spec.text_tokens, generator)
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def time_generation(model, spec: DitModel, inputs: dict, calls: int, timer: OverheadTimer, clock: BlockClock) -> Run:
    """Time ``calls`` consecutive model calls of a generation (module docstring) on both clocks."""
    scheduler = spec.scheduler()
    sample = inputs["hidden_states"]
    tokens = sample.shape[1] if sample.ndim == 3 else (sample.shape[-1] // 2) ** 2  # Flux's are packed already
    spec.set_timesteps(scheduler, spec.steps, tokens, timer.device)
    cached = getattr(model, "is_cache_enabled", False)
    if cached:
        model._reset_stateful_cache()  # a new generation for the cache, as a pipeline call starts one
    timer.reset()
    clock.reset()
    synchronize(timer.device)
    start = timer.clock()
    for t in scheduler.timesteps[:calls]:
        CURRENT_TIMESTEP[0] = t
        with model.cache_context("cond") if cached else contextlib.nullcontext():  # as the pipelines call it
            output = model(**{**inputs, "hidden_states": sample}, timestep=spec.timestep(t, sample), return_dict=False)[0]
        sample = scheduler.step(output[:, : sample.shape[1]], t, sample, return_dict=False)[0]  # PixArt: learned sigma
    synchronize(timer.device)
    return Run(calls, timer.clock() - start, clock.seconds.copy(), clock.plans.copy(), _pair(timer.seconds["plan"]),
               _pair(timer.seconds["merging"]), timer.plans, list(spec.counts(model)))


def run_resolution(model, spec: DitModel, side: int, batch: int, repetitions: int, calls: int, device,
                   clock: str = "wall", table: list[Arm] | None = None) -> list[Arm]:
    """Every arm of ``table`` (default :func:`arms`) once per repetition, interleaved: a generation
    of ``calls`` calls at ``side x side`` pixels. Returns the arms with their runs."""
    if not 1 <= calls <= spec.steps:
        raise ValueError(f"calls={calls}: a {spec.title} generation has 1..{spec.steps} calls")
    counts = spec.counts(model)
    if sum(counts) < 3 or min(counts) < 1 + (len(counts) > 1):
        raise ValueError(f"{counts} blocks: every stack needs a block between the model's first and its last block")
    dtype = next(model.parameters()).dtype
    inputs = make_inputs(spec, model, side, batch, dtype, device)
    small = make_inputs(spec, model, 64, batch, dtype, device)  # a 4x4 token grid, for the arms' warm-up
    table = arms() if table is None else table
    timer = OverheadTimer(device, both_clocks)
    blocks = BlockClock(spec.blocks(model), timer)
    index = CLOCK_INDEX[clock]

    def warm_up(timer: OverheadTimer) -> float:
        for arm in table[1:]:
            arm.patch(model)
            time_generation(model, spec, small, 1, timer, blocks)
        table[0].patch(model)
        return time_generation(model, spec, inputs, 1, timer, blocks).seconds[index]

    def timed(arm: Arm, timer: OverheadTimer) -> float:
        arm.pending = time_generation(model, spec, inputs, calls, timer, blocks)
        return arm.pending.seconds[index] / calls

    with blocks.installed():
        return bench_unet.run_interleaved(model, side, table, repetitions, timer, warm_up, timed, rotate=True)


def _median(values) -> float:
    return statistics.median(values)


def speedup(arm: list[float], unpatched: list[float]) -> str:
    """Unpatched time over the arm's, ``median (min-max)`` of the per-repetition ratios."""
    return paired_ratio(unpatched, arm)


def markdown(spec: DitModel, side: int, batch: int, table: list[Arm], clocks=("cpu", "wall"),
             quick: bool = False) -> str:
    """The two tables of one model at one resolution: speed-ups against the FLOP bounds, and the
    parts of the scaled step. ``clocks``: the clocks shown; the first one's for the shares and parts."""
    base = table[0]
    blocks = len(base.runs[0].blocks)
    depth, depths, tokens, calls = spec.depth, spec.depths, (side // 16) ** 2, base.runs[0].calls
    measured, full = spec.shape(blocks, quick), spec.shape(None, quick)
    first = CLOCK_INDEX[clocks[0]]
    title = f"{spec.title}{' (tiny widths)' if quick else ''} {side}x{side}, batch {batch}, {blocks} of {depth} blocks"
    header = [f"{title}, {calls} calls"] + [f"{c} s/call" for c in clocks]
    header += [f"speed-up, {blocks} blocks, {c} (range)" for c in clocks] + [f"FLOP bound, {blocks} blocks"]
    header += [f"speed-up, {depth}-block step, {c} (range)" for c in clocks] + [f"FLOP bound, {depth}-block step"]
    header += [f"plan share ({clocks[0]})", f"merge/unmerge share ({clocks[0]})"]
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    for arm in table:
        cells = [arm.label] + [f"{_median(arm.per_call(CLOCK_INDEX[c])):.3f}" for c in clocks]
        cells += [speedup(arm.per_call(CLOCK_INDEX[c]), base.per_call(CLOCK_INDEX[c])) for c in clocks]
        cells.append(f"{dit_flops.flop_bound(measured, tokens, arm.keep_rate, arm.options):.3f}")
        cells += [speedup(arm.steps(depths, CLOCK_INDEX[c]), base.steps(depths, CLOCK_INDEX[c])) for c in clocks]
        cells.append(f"{dit_flops.flop_bound(full, tokens, arm.keep_rate, arm.options):.3f}")
        for kind in ("plan", "merging"):
            share = _median(getattr(run, kind)[first] / run.seconds[first] for run in arm.runs)
            cells.append("" if arm.library == "none" else f"{100 * share:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + parts_markdown(spec, side, table, clocks[0], quick)


def parts_markdown(spec: DitModel, side: int, table: list[Arm], clock: str, quick: bool = False) -> str:
    """Per arm, the parts of the scaled step (medians over the repetitions, seconds per call)."""
    base, index, depth = table[0], CLOCK_INDEX[clock], spec.depth
    blocks, tokens = len(table[0].runs[0].blocks), (side // 16) ** 2
    shape = spec.shape(blocks, quick)

    def middle(run: Run) -> float:  # one middle block, its plans left out
        inner = slice(1, blocks - 1)
        return (run.blocks[inner, index] - run.block_plans[inner, index]).sum() / (blocks - 2) / run.calls

    lines = [
        f"| parts, {clock} s/call | outside the blocks | first block | last block | middle block, plans left out "
        f"| middle block speed-up (range) | FLOP bound, one block | plans per call | plan s/call, {blocks} blocks "
        f"| plan s/call, {depth} blocks | {depth}-block step s/call |",
        "| --- |" + " ---: |" * 10,
    ]
    for arm in table:
        runs, shares = arm.runs, arm.options.get("share_plans", False)
        plan = _median(run.block_plans[1:-1, index].sum() / run.calls for run in runs)
        scaled_plan = _median(run.scaled_plans(spec.depths, shares)[index] / run.calls for run in runs)
        cells = [
            arm.label,
            f"{_median((run.seconds[index] - run.blocks[:, index].sum()) / run.calls for run in runs):.3f}",
            f"{_median(run.blocks[0, index] / run.calls for run in runs):.3f}",
            f"{_median(run.blocks[-1, index] / run.calls for run in runs):.3f}",
            f"{_median(middle(run) for run in runs):.3f}",
            speedup([middle(run) for run in runs], [middle(run) for run in base.runs]),
            f"{dit_flops.block_bound(shape, tokens, arm.keep_rate, arm.options):.3f}",
            f"{_median(run.plans / run.calls for run in runs):g}",
            f"{plan:.3f}",
            f"{scaled_plan:.3f}",
            f"{_median(arm.steps(spec.depths, index)):.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(spec_name: str, side: int, table: list[Arm], clocks=("cpu", "wall")) -> list[str]:
    """The issues' goals for this model and resolution, met or missed, on every clock (``[]`` where
    there are none): the full-step speed-up of each goal's arm; and where the goals hold, for each
    arm with a cache on top of merging, whether its speed-up is the product of the cache's alone
    and the merging's alone, within :data:`MULTIPLY_WITHIN`."""
    goals, spec, base = GOALS.get((spec_name, side), {}), MODELS[spec_name], table[0]
    by_setting = {(arm.cache, arm.method, arm.keep_rate, tuple(sorted(arm.options.items()))): arm for arm in table}

    def full_step(arm: Arm, clock: str) -> float:
        index = CLOCK_INDEX[clock]
        return _median([b / a for a, b in zip(arm.steps(spec.depths, index), base.steps(spec.depths, index))])

    lines = []
    for arm in table:
        if arm.label not in goals:
            continue
        figures = []
        for clock in clocks:
            verdict = "met" if full_step(arm, clock) >= goals[arm.label] else "MISSED"
            figures.append(f"{clock} {full_step(arm, clock):.3f}x: {verdict}")
        lines.append(f"- goal {arm.label} >= {goals[arm.label]}x per {spec.depth}-block step: " + "; ".join(figures))
    for arm in table if goals else ():
        options = tuple(sorted(arm.options.items()))
        cache, merging = by_setting.get((arm.cache, None, None, ())), by_setting.get((None, arm.method, arm.keep_rate, options))
        if arm.cache is None or arm.method is None or cache is None or merging is None:
            continue
        figures = []
        for clock in clocks:
            product = full_step(cache, clock) * full_step(merging, clock)
            ratio = full_step(arm, clock) / product
            verdict = "met" if abs(ratio - 1) <= MULTIPLY_WITHIN else "MISSED"
            figures.append(f"{clock} {full_step(arm, clock):.3f}x vs {product:.3f}x ({ratio:.3f}): {verdict}")
        lines.append(f"- goal {arm.label}: {cache.label} x {merging.label} within {MULTIPLY_WITHIN:.0%}: " + "; ".join(figures))
    return lines


def runs_to_json(arm: Arm) -> list[dict]:
    """An arm's runs as JSON-ready dicts (arrays as lists)."""
    return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in vars(run).items()} for run in arm.runs]


def arms_from_json(rows: dict[str, list[dict]]) -> list[Arm]:
    """Arms (:func:`arms`) with the runs :func:`runs_to_json` wrote, by label."""
    by_label = {label: name for name, (label, *_) in {**ARMS, **EXTRA_ARMS}.items()}
    table = arms([by_label[label] for label in rows])
    for arm in table:
        arm.runs = [Run(**{k: np.array(v) if isinstance(v, list) else v for k, v in run.items()}) for run in rows[arm.label]]
    return table


def measure(models, sides, blocks: int | None, batch: int | None, repetitions: int, calls: int, quick: bool, dtype,
            device, clock: str = "wall", names=None) -> list[dict]:
    """:func:`run_resolution` of the arms ``names`` (:func:`arms`; default: each model's
    :data:`DEFAULT_ARMS`) for every model of ``models``
    (names of :data:`MODELS`) built with ``blocks`` blocks (``None``: all), at batch ``batch`` (``None``:
    the model's :attr:`DitModel.batch`), at every side of
    ``sides``; one JSON-ready result for each, ``{model, side, batch, line, arms}`` (``arms``:
    label -> :func:`runs_to_json`)."""
    results = []
    for name in models:
        spec = MODELS[name]
        size = spec.batch if batch is None else batch
        model = build(spec, None if blocks is None else min(blocks, spec.depth), quick, dtype, device)
        line = model_line(spec, model, size, repetitions, calls)
        print(line, flush=True)
        for side in sides:
            table = run_resolution(model, spec, side, size, repetitions, calls, device, clock,
                                   arms(DEFAULT_ARMS[name] if names is None else names))
            results.append({"model": name, "side": side, "batch": size, "line": line,
                            "arms": {arm.label: runs_to_json(arm) for arm in table}})
        del model
    return results


def report(results: list[dict], clocks, quick: bool, goals: bool = True) -> list[str]:
    """Markdown of :func:`measure`'s results: each model's line, its tables, and (``goals``) the
    issue's goals met or missed."""
    lines = []
    for result in results:
        spec, table = MODELS[result["model"]], arms_from_json(result["arms"])
        lines += ["", result["line"] + ".", "", markdown(spec, result["side"], result["batch"], table, clocks, quick)]
        verdicts = goal_lines(result["model"], result["side"], table, clocks) if goals else []
        lines += ["", *verdicts] if verdicts else []
    return lines


def environment(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Markdown lines naming the machine, threads, versions, dtype and the run."""
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else bench_unet.cpu_name()
    versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("torch", "diffusers"))
    return [
        f"- machine: {machine}, {torch.get_num_threads()} torch threads; {versions}",
        f"- {str(dtype).removeprefix('torch.')}, random weights (seed 0); sdmerge imported from "
        f"{Path(sdmerge.__file__).parent}",
        f"- run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average at the start "
        f"{os.getloadavg()[0]:.2f}: python {' '.join(sys.argv)}",
    ]


def model_line(spec: DitModel, model, batch: int, repetitions: int, calls: int) -> str:
    """What one model's tables measured: depth, attention processors, batch, repetitions, calls."""
    processors = ", ".join(sorted({type(p).__name__ for p in model.attn_processors.values()}))
    return (
        f"{spec.title}: {' + '.join(map(str, spec.counts(model)))} of {' + '.join(map(str, spec.depths))} blocks, "
        f"attention processors {processors} (torch SDPA), {spec.text_tokens} prompt tokens, batch {batch}, {repetitions} interleaved "
        f"repetitions of a {calls}-call generation per arm"
    )


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--resolutions", type=int, nargs="+", choices=(512, 1024), default=[1024, 512],
                        help="image side in pixels (latent side / 8, tokens (side / 16)^2)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, *EXTRA_ARMS],
                        help="the arms to time (default: the issues' arms of each model, Flux's with PAB; unpatched "
                        "always runs, first): "
                        + "; ".join(f"{name}: {label}" for name, (label, *_) in {**ARMS, **EXTRA_ARMS}.items()))
    parser.add_argument("--calls", type=int, default=5, help="model calls per generation (default 5)")
    parser.add_argument("--batch", type=int,
                        help="model batch (default: 2, classifier-free guidance; FLUX.1-dev 1, guidance distilled)")
    parser.add_argument("--blocks-at-real-width", type=int, default=4,
                        help="blocks of the measured model, split over Flux's two stacks (at least 3, Flux 4; "
                        "default 4; the released depth: no scaling)")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny widths, {QUICK_SIDE}x{QUICK_SIDE} pixels, 1 repetition: checks the script")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--clock", choices=sorted(CLOCK_INDEX),
                        help="the clock of the first columns, the shares and the parts (both clocks are always "
                        "read); cpu: this process's CPU time, CPU only (default: cpu on the CPU, wall on a GPU)")
    parser.add_argument("--out", help="markdown file to write (default: print only); the raw times go to OUT.json")
    parser.add_argument("--render", metavar="JSON", help="print the tables of a previous run's OUT.json, measure nothing")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.clock = args.clock or ("cpu" if device.type == "cpu" else "wall")
    if args.clock == "cpu" and device.type != "cpu":
        parser.error("--clock cpu times this process's CPU time: use --clock wall on a GPU")
    if args.repetitions < 1 or args.blocks_at_real_width < 3:
        parser.error("--repetitions must be at least 1 and --blocks-at-real-width at least 3")
    sides = [QUICK_SIDE] if args.quick else args.resolutions
    repetitions = 1 if args.quick else args.repetitions
    clocks = (args.clock, "wall" if args.clock == "cpu" else "cpu")

    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text = "\n".join(saved["header"] + report(saved["results"], clocks, saved["quick"])) + "\n"
        print(text, flush=True)
        return text

    header = ["# Diffusion transformers" + (" (quick: tiny widths, the numbers mean nothing)" if args.quick else "")]
    header += [""] + environment(device, dtype)
    results = measure(args.models, sides, args.blocks_at_real_width, args.batch, repetitions, args.calls,
                      args.quick, dtype, device, args.clock, args.arms)
    lines = header + report(results, clocks, args.quick)
    text = "\n".join(lines) + "\n"
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        Path(f"{out}.json").write_text(json.dumps({"header": header, "quick": args.quick, "results": results}))
    print("\n" + text, flush=True)
    return text


if __name__ == "__main__":
    main()
