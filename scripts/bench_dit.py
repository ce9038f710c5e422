"""Benchmark: diffusion transformers (SD3-Medium, PixArt-Sigma) at their real widths, merged and
unmerged, against the bound of their counted FLOPs (issue 21).

What is timed: model calls of a bare ``SD3Transformer2DModel`` / ``PixArtTransformer2DModel``
with random weights from the released models' configs (SD3-Medium: 24 joint blocks, width 1536,
24 heads, 333 prompt tokens = 77 CLIP + 256 T5; PixArt-Sigma: 28 blocks, width 1152, 16 heads,
a 300-token T5 prompt through cross-attention), built with fewer blocks
(``--blocks-at-real-width``, default 4): the first and the last block, which sdmerge leaves
unmerged by default, and the blocks between them, which it merges. Each arm runs a generation of
``--calls`` consecutive calls (default 5) at the timesteps of the model's pipeline scheduler
(SD3: flow-matching Euler, shift 3, 28 steps: 1000, 987, 974, ...; PixArt-Sigma: DPM-Solver++
with diffusers' default betas, 20 steps: 999, 949, ...), each call's latent the scheduler's step
from the previous output, so that ``plan_every`` reuses plans as in a pipeline; a figure per call
is the generation's time divided by its calls (the planning call and the reusing calls together).

Arms (:func:`arms`): unpatched; ``tome`` r=0.5 (self-attention only); ``tome`` r=0.5 with
``merge_mlp``; ``grid`` r=0.25 with ``kv_only``; ``atc_average`` r=0.5 with ``share_plans=True,
plan_every=5``; on request (``--arms``) ``tome`` r=0.5 with ``merge_mlp`` and ``share_plans`` (one
bipartite matching per call instead of one per merged block). Each repetition runs every arm once, in turn (interleaved), after one untimed
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
whole model, whatever its depth). The second table gives these parts per arm.

    PYTHONPATH=. python scripts/bench_dit.py --quick        # tiny widths, seconds: checks the script
    PYTHONPATH=. python scripts/bench_dit.py --models sd3 --resolutions 1024 512 --repetitions 3 --threads 2
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
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
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
QUICK_SIDE = 128  # --quick: 128x128 pixels, a 16x16 latent, 8x8 = 64 image tokens


def _sd3_inputs(config: dict, batch: int, latent: int, text: int, generator: torch.Generator) -> dict:
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], latent, latent, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, config["joint_attention_dim"], generator=generator),
        "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], generator=generator),
    }


def _pixart_inputs(config: dict, batch: int, latent: int, text: int, generator: torch.Generator) -> dict:
    return {
        "hidden_states": torch.randn(batch, config["in_channels"], latent, latent, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, config["caption_channels"], generator=generator),
        "encoder_attention_mask": torch.ones(batch, text),  # as the pipeline passes it (1: a kept token)
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


@dataclass(frozen=True)
class DitModel:
    """One benchmarked model: its diffusers class and config, prompt length, pipeline scheduler."""

    title: str
    family: str  # dit_flops.ModelShape.family
    model_class: type
    config: dict
    tiny: dict  # --quick: the config's widths replaced by these
    text_tokens: int
    make_inputs: Callable[[dict, int, int, int, torch.Generator], dict]
    scheduler: Callable[[], object]
    steps: int  # the pipeline's default num_inference_steps

    def model_config(self, blocks: int | None = None, quick: bool = False) -> dict:
        """The config to build: ``blocks`` blocks (default: the released depth), tiny widths with ``quick``."""
        return {**self.config, **(self.tiny if quick else {}), "num_layers": blocks or self.config["num_layers"]}

    @property
    def depth(self) -> int:
        return self.config["num_layers"]

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
    seconds, and the plans computed."""

    calls: int
    seconds: np.ndarray
    blocks: np.ndarray  # [n, 2]
    block_plans: np.ndarray  # [n, 2]
    plan: np.ndarray
    merging: np.ndarray
    plans: int

    def scaled_step(self, depth: int, shares_plans: bool) -> np.ndarray:
        """``[cpu, wall]`` seconds per call of the same arm in a ``depth``-block model (module docstring)."""
        blocks, plans = self.blocks, self.block_plans
        middle = slice(1, len(blocks) - 1)
        scale = (depth - 2) / (len(blocks) - 2)
        outside = self.seconds - blocks.sum(axis=0)
        work = scale * (blocks[middle] - plans[middle]).sum(axis=0)
        planning = (1 if shares_plans else scale) * plans[middle].sum(axis=0)
        return (outside + blocks[0] + blocks[-1] + work + planning) / self.calls


@dataclass
class Arm(Setting):
    """One arm (``bench_unet.Setting``: its label and how it patches the model) with its timed
    generations (:class:`Run`), one per repetition."""

    runs: list[Run] = field(default_factory=list)
    pending: Run | None = None  # the run being recorded (set by the timed function)

    def record(self, seconds: float, timer: OverheadTimer) -> None:
        super().record(seconds, timer)
        self.runs.append(self.pending)

    def per_call(self, clock: int) -> list[float]:
        return [run.seconds[clock] / run.calls for run in self.runs]

    def steps(self, depth: int, clock: int) -> list[float]:
        shares = self.options.get("share_plans", False)
        return [run.scaled_step(depth, shares)[clock] for run in self.runs]


ARMS = {  # name: (label, method, keep rate, options); the arms, unpatched first
    "unpatched": ("unpatched", None, None, {}),
    "tome": ("tome r=0.5", "tome", 0.5, {}),
    "tome_mlp": ("tome r=0.5, merge_mlp", "tome", 0.5, {"merge_mlp": True}),
    "grid_kv": ("grid r=0.25, kv_only", "grid", 0.25, {"kv_only": True}),
    "atc_reuse": ("atc_average r=0.5, share_plans, plan_every=5", "atc_average", 0.5,
                  {"share_plans": True, "plan_every": 5}),
}
EXTRA_ARMS = {  # on request (--arms): what the arms suggest trying
    "tome_mlp_shared": ("tome r=0.5, merge_mlp, share_plans", "tome", 0.5, {"merge_mlp": True, "share_plans": True}),
}
GOALS = {  # issue 21: speed-ups of a full SD3-Medium step at 1024x1024 on the CPU
    ("sd3", 1024): {"tome r=0.5, merge_mlp": 1.75, "grid r=0.25, kv_only": 1.3,
                    "atc_average r=0.5, share_plans, plan_every=5": 1.35},
}


def arms(names=tuple(ARMS)) -> list[Arm]:
    """Fresh arms (they keep their runs) of ``names`` (keys of :data:`ARMS` / :data:`EXTRA_ARMS`),
    the unpatched one first, whether named or not."""
    catalog = {**ARMS, **EXTRA_ARMS}
    names = ["unpatched"] + [name for name in names if name != "unpatched"]
    return [Arm(label, "none" if method is None else "sdmerge", method, r, dict(options))
            for label, method, r, options in (catalog[name] for name in names)]


class BlockClock:
    """``[cpu, wall]`` seconds spent in each transformer block of ``model`` (forward hooks, the
    device synchronised around each block), and the part of them ``timer`` counted as plans."""

    def __init__(self, model, timer: OverheadTimer):
        self.blocks = list(model.transformer_blocks)
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
    """The transformer with ``blocks`` blocks (default: all), random weights (seed 0)."""
    torch.manual_seed(0)
    model = spec.model_class(**spec.model_config(blocks, quick)).to(device).eval()
    return model if dtype == torch.float32 else model.to(dtype)  # diffusers warns about any to(dtype=...)


def make_inputs(spec: DitModel, model, side: int, batch: int, dtype, device) -> dict:
    """The model's keyword arguments but the timestep, for ``side x side`` pixels (latent ``side / 8``)."""
    generator = torch.Generator().manual_seed(side)
    inputs = spec.make_inputs(model.config, batch, side // 8, spec.text_tokens, generator)
    return {k: v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def time_generation(model, spec: DitModel, inputs: dict, calls: int, timer: OverheadTimer, clock: BlockClock) -> Run:
    """Time ``calls`` consecutive model calls of a generation (module docstring) on both clocks."""
    scheduler = spec.scheduler()
    scheduler.set_timesteps(spec.steps, device=timer.device)
    sample = inputs["hidden_states"]
    timer.reset()
    clock.reset()
    synchronize(timer.device)
    start = timer.clock()
    for t in scheduler.timesteps[:calls]:
        output = model(**{**inputs, "hidden_states": sample}, timestep=t.expand(sample.shape[0]), return_dict=False)[0]
        sample = scheduler.step(output[:, : sample.shape[1]], t, sample, return_dict=False)[0]  # PixArt: learned sigma
    synchronize(timer.device)
    return Run(calls, timer.clock() - start, clock.seconds.copy(), clock.plans.copy(), _pair(timer.seconds["plan"]),
               _pair(timer.seconds["merging"]), timer.plans)


def run_resolution(model, spec: DitModel, side: int, batch: int, repetitions: int, calls: int, device,
                   clock: str = "wall", table: list[Arm] | None = None) -> list[Arm]:
    """Every arm of ``table`` (default :func:`arms`) once per repetition, interleaved: a generation
    of ``calls`` calls at ``side x side`` pixels. Returns the arms with their runs."""
    if not 1 <= calls <= spec.steps:
        raise ValueError(f"calls={calls}: a {spec.title} generation has 1..{spec.steps} calls")
    if len(model.transformer_blocks) < 3:
        raise ValueError("the model needs at least 3 blocks: the first, one merged block, the last")
    dtype = next(model.parameters()).dtype
    inputs = make_inputs(spec, model, side, batch, dtype, device)
    small = make_inputs(spec, model, 64, batch, dtype, device)  # a 4x4 token grid, for the arms' warm-up
    table = arms() if table is None else table
    timer = OverheadTimer(device, both_clocks)
    blocks = BlockClock(model, timer)
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
        return bench_unet.run_interleaved(model, side, table, repetitions, timer, warm_up, timed)


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
    depth, tokens, calls = spec.depth, (side // 16) ** 2, base.runs[0].calls
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
        cells += [speedup(arm.steps(depth, CLOCK_INDEX[c]), base.steps(depth, CLOCK_INDEX[c])) for c in clocks]
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
            f"{plan * (1 if shares else (depth - 2) / (blocks - 2)):.3f}",
            f"{_median(arm.steps(depth, index)):.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_lines(spec_name: str, side: int, table: list[Arm], clocks=("cpu", "wall")) -> list[str]:
    """Issue 21's goals for this model and resolution: the full-step speed-up of each goal's arm,
    met or missed, on every clock (``[]`` where there are no goals)."""
    goals, spec, base = GOALS.get((spec_name, side), {}), MODELS[spec_name], table[0]
    lines = []
    for arm in table:
        if arm.label not in goals:
            continue
        figures = []
        for clock in clocks:
            ratios = [b / a for a, b in zip(arm.steps(spec.depth, CLOCK_INDEX[clock]), base.steps(spec.depth, CLOCK_INDEX[clock]))]
            verdict = "met" if _median(ratios) >= goals[arm.label] else "MISSED"
            figures.append(f"{clock} {_median(ratios):.3f}x: {verdict}")
        lines.append(f"- goal {arm.label} >= {goals[arm.label]}x per {spec.depth}-block step: " + "; ".join(figures))
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


def measure(models, sides, blocks: int | None, batch: int, repetitions: int, calls: int, quick: bool, dtype,
            device, clock: str = "wall", names=tuple(ARMS)) -> list[dict]:
    """:func:`run_resolution` of the arms ``names`` (:func:`arms`) for every model of ``models``
    (names of :data:`MODELS`) built with ``blocks`` blocks (``None``: all) at every side of
    ``sides``; one JSON-ready result for each, ``{model, side, batch, line, arms}`` (``arms``:
    label -> :func:`runs_to_json`)."""
    results = []
    for name in models:
        spec = MODELS[name]
        model = build(spec, None if blocks is None else min(blocks, spec.depth), quick, dtype, device)
        line = model_line(spec, model, batch, repetitions, calls)
        print(line, flush=True)
        for side in sides:
            table = run_resolution(model, spec, side, batch, repetitions, calls, device, clock, arms(names))
            results.append({"model": name, "side": side, "batch": batch, "line": line,
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
        f"{spec.title}: {len(model.transformer_blocks)} of {spec.depth} blocks, attention processors "
        f"{processors} (torch SDPA), {spec.text_tokens} prompt tokens, batch {batch}, {repetitions} interleaved "
        f"repetitions of a {calls}-call generation per arm"
    )


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["sd3", "pixart"])
    parser.add_argument("--resolutions", type=int, nargs="+", choices=(512, 1024), default=[1024, 512],
                        help="image side in pixels (latent side / 8, tokens (side / 16)^2)")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--arms", nargs="+", choices=[*ARMS, *EXTRA_ARMS], default=list(ARMS),
                        help="the arms to time (default: the issue's; unpatched always runs, first): "
                        + "; ".join(f"{name}: {label}" for name, (label, *_) in {**ARMS, **EXTRA_ARMS}.items()))
    parser.add_argument("--calls", type=int, default=5, help="model calls per generation (default 5)")
    parser.add_argument("--batch", type=int, default=2, help="model batch (default 2: classifier-free guidance)")
    parser.add_argument("--blocks-at-real-width", type=int, default=4,
                        help="blocks of the measured model (at least 3; default 4; the released depth: no scaling)")
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
