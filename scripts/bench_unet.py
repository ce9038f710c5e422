"""Benchmark: one UNet step, or the first UNet calls of a generation, of SD-1.5: unpatched vs
tomesd vs sdmerge.

One UNet call (one denoising step) at 512x512 (64x64 latent, batch 2: the doubled batch of
classifier-free guidance) and 1024x1024 (128x128 latent, batch 1), with the UNet's default
attention processor (``AttnProcessor2_0``: torch SDPA). Configurations:

- the unpatched UNet;
- ``tomesd.apply_patch(unet, ratio=0.5 / 0.6)`` (its defaults otherwise: ``use_rand=True``);
- ``sdmerge.apply(unet, method, r=0.5 / 0.4)`` for ``tome``, ``atc_average`` and ``cis``
  (tomesd's ``ratio`` is ``1 - r``); defaults otherwise (``use_rand=True``, ``max_downsample=1``).

Each repetition runs every configuration once, in turn (interleaved), after one untimed
warm-up call of the unpatched UNet per resolution. ``cis`` is timed on the second call of a
generation (its first call has no prompt attention mass yet and costs what ``tome`` costs),
so it pays for the prompt mass and the value norms.

The table gives the median seconds per step (elapsed, or with ``--clock cpu`` this process's
CPU time), the ratio to the unpatched UNet, the ratio of sdmerge ``tome`` to tomesd at the
same setting (the median of the ratios within each repetition, and their range), and the
share of the step spent on the work merging adds, timed around the calls that do it (exact
on the CPU; on a GPU each timer synchronises the device):

- plan: computing merge plans (sdmerge: grouping, split and importance, plus for ``cis`` the
  prompt attention mass; tomesd: its ``compute_merge``, which computes the matching);
- merge/unmerge: applying them (sdmerge: ``MergePlan.merge`` / ``unmerge``; tomesd: the merge
  and unmerge functions ``compute_merge`` returns).

Everything else in a merged step is the same work for both libraries (the same layers on the
same numbers of tokens), so for ``tome`` the table also gives the ratio of this added work,
sdmerge over tomesd (median of the per-repetition ratios): unlike whole steps, it is not
drowned by the machine's noise.

Generation mode (``--mode generation``): ``--calls`` consecutive UNet calls (default 5) at the
timesteps of SD-1.5's default scheduler (PNDM with SD-1.5's scheduler config, 50 steps: 981,
961, 961, 941, 921, ...), each call's sample the scheduler's step from the previous output, as in
a pipeline. Arms (:func:`generation_settings`): unpatched, tomesd ratio 0.6, sdmerge ``tome``
r=0.4, ``atc_average`` r=0.4, and ``atc_average`` r=0.4 with plan reuse (``share_plans``,
``plan_every=5``, both). Each repetition runs every arm's generation once, in turn, after one
untimed unpatched call. The table gives the median seconds per generation, and the ratios to
the unpatched UNet and to tomesd as medians of the per-repetition ratios (paired: measured in
the same repetition) with their range, the plan share, and the plans computed per generation
(sdmerge: ``MergedBlock`` plan computations; tomesd: ``compute_merge`` calls that merge).

Modes mode (``--mode modes``): one UNet call per arm, as the step mode, for the merging modes
(:func:`modes_settings`): unpatched; tomesd ratio 0.5 merging the self-attention, also the
cross-attention (``merge_crossattn``), also the feed-forward (``merge_mlp``), and both; sdmerge
``tome`` r=0.5 with the same options (the same names); the keys-and-values mode (``kv_only``) for
``tome`` and the ``grid`` grouping at r=0.5 and r=0.25; ``grid`` merging at r=0.25. Besides the
step mode's columns, the table gives every arm's paired ratio to tomesd ratio 0.5 (self-attention
only). sdmerge ``tome`` arms are paired with the tomesd arm of the same options.

Importable (``scripts/`` on ``sys.path``, ``import bench_unet``); stable names: :func:`load_unet`,
:func:`settings` / :func:`run_resolution` / :func:`markdown` (step mode),
:func:`generation_settings` / :func:`pndm_timesteps` / :func:`time_generation` /
:func:`run_generation` / :func:`generation_markdown` (generation mode), :func:`make_inputs`,
:func:`paired_ratio`, :class:`Setting`, :class:`OverheadTimer`. ``run_resolution`` and
``run_generation`` take ``batch`` for other sizes than :data:`RESOLUTIONS` (tests: tiny UNets).

Weights: random, from SD-1.5's UNet config (no download), unless ``--unet`` names a local
diffusers UNet directory or a pipeline directory (loaded with ``from_pretrained``).

    python scripts/bench_unet.py                          # 512 and 1024, 3 repetitions
    python scripts/bench_unet.py --quick                  # 512 only, 1 repetition
    python scripts/bench_unet.py --resolutions 1024 --repetitions 1 --threads 1 --clock cpu
    python scripts/bench_unet.py --methods tome --repetitions 7 --threads 1 --clock cpu
    python scripts/bench_unet.py --device cuda --dtype float16
    python scripts/bench_unet.py --mode generation --resolutions 512 --repetitions 2 --threads 1 --clock cpu
    python scripts/bench_unet.py --mode modes --repetitions 3 --threads 1 --clock cpu
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import PNDMScheduler, UNet2DConditionModel

import sdmerge
import sdmerge.diffusion.prompt_importance
from sdmerge.core import MergePlan
from sdmerge.diffusion import MergedBlock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/
from eval.optional import optional_import, require  # noqa: E402

tomesd = optional_import("tomesd")  # what sdmerge is compared with; imports its merge and patch modules

SD15_UNET_CONFIG = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_SCHEDULER_CONFIG = dict(  # runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
)
INFERENCE_STEPS = 50  # the pipeline's default num_inference_steps
RESOLUTIONS = {512: 2, 1024: 1}  # image side -> UNet batch
PROMPT_TOKENS = 77


@dataclass
class Setting:
    """One configuration of the UNet, timed in every repetition."""

    label: str
    library: str  # "none" | "tomesd" | "sdmerge"
    method: str | None = None
    keep_rate: float | None = None
    options: dict = field(default_factory=dict)  # further apply options (sdmerge: plan_every, kv_only, ...; both: merge_*)
    times: list[float] = field(default_factory=list)
    plan_times: list[float] = field(default_factory=list)
    merging_times: list[float] = field(default_factory=list)
    plans: list[int] = field(default_factory=list)  # plan computations per timed run

    def patch(self, unet: UNet2DConditionModel) -> None:
        tomesd.remove_patch(unet)
        sdmerge.remove(unet)
        if self.library == "tomesd":
            tomesd.apply_patch(unet, ratio=round(1 - self.keep_rate, 6), **self.options)
        elif self.library == "sdmerge":
            sdmerge.apply(unet, self.method, r=self.keep_rate, **self.options)

    def record(self, seconds: float, timer: OverheadTimer) -> None:
        """Keep one timed run: its seconds and what ``timer`` measured during it."""
        self.times.append(seconds)
        self.plan_times.append(timer.seconds["plan"])
        self.merging_times.append(timer.seconds["merging"])
        self.plans.append(timer.plans)


METHODS = ("tome", "atc_average", "cis")


def settings(methods=METHODS, keep_rates=(0.5, 0.4)) -> list[Setting]:
    """The arms of the step mode: unpatched, then per keep rate tomesd and every sdmerge method."""
    out = [Setting("unpatched", "none")]
    for keep_rate in keep_rates:
        out.append(Setting(f"tomesd ratio={1 - keep_rate:.1f}", "tomesd", "tome", keep_rate))
        for method in methods:
            out.append(Setting(f"sdmerge {method} r={keep_rate}", "sdmerge", method, keep_rate))
    return out


REUSE_VARIANTS = (
    ("share_plans", {"share_plans": True}),
    ("plan_every=5", {"plan_every": 5}),
    ("share_plans, plan_every=5", {"share_plans": True, "plan_every": 5}),
)


def generation_settings(
    keep_rate: float = 0.4, reuse_methods=("atc_average",), reuse_variants=REUSE_VARIANTS
) -> list[Setting]:
    """The arms of the generation mode: unpatched, tomesd at ``ratio = 1 - keep_rate``, sdmerge
    ``tome`` and every method of ``reuse_methods`` at ``keep_rate``, then each of those methods
    with every ``(label, sdmerge.apply options)`` of ``reuse_variants``."""
    out = [
        Setting("unpatched", "none"),
        Setting(f"tomesd ratio={1 - keep_rate:.1f}", "tomesd", "tome", keep_rate),
        Setting(f"sdmerge tome r={keep_rate}", "sdmerge", "tome", keep_rate),
    ]
    out += [Setting(f"sdmerge {m} r={keep_rate}", "sdmerge", m, keep_rate) for m in reuse_methods if m != "tome"]
    for method in reuse_methods:
        for label, options in reuse_variants:
            out.append(Setting(f"sdmerge {method} r={keep_rate}, {label}", "sdmerge", method, keep_rate, dict(options)))
    return out


BRANCH_VARIANTS = (
    ("", {}),
    ("merge_crossattn", {"merge_crossattn": True}),
    ("merge_mlp", {"merge_mlp": True}),
    ("merge_crossattn, merge_mlp", {"merge_crossattn": True, "merge_mlp": True}),
)
REFERENCE = "tomesd ratio=0.5"  # the arm every arm of the modes mode is compared with


def modes_settings(branch_variants=BRANCH_VARIANTS, kv_keep_rates=(0.5, 0.25)) -> list[Setting]:
    """The arms of the modes mode: unpatched; tomesd and sdmerge ``tome`` at 0.5 with each
    ``(label, options)`` of ``branch_variants``; ``kv_only`` for ``tome`` and ``grid`` at each of
    ``kv_keep_rates``; ``grid`` merging at 0.25. The first tomesd arm is :data:`REFERENCE`; each
    tomesd arm runs right before the sdmerge arm it is paired with (a drift of the machine's speed
    within a repetition then hardly enters the pair's ratio)."""
    out = [Setting("unpatched", "none")]
    for label, options in branch_variants:  # each tomesd arm right before its sdmerge pair
        for library, name in (("tomesd", REFERENCE), ("sdmerge", "sdmerge tome r=0.5")):
            out.append(Setting(f"{name}, {label}" if label else name, library, "tome", 0.5, dict(options)))
    for method in ("tome", "grid"):
        for keep_rate in kv_keep_rates:
            out.append(Setting(f"sdmerge {method} r={keep_rate}, kv_only", "sdmerge", method, keep_rate, {"kv_only": True}))
    out.append(Setting("sdmerge grid r=0.25", "sdmerge", "grid", 0.25))
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


class OverheadTimer:
    """Accumulates the seconds spent on the work merging adds to a step, by wrapping the
    functions that do it: ``plan`` (computing merge plans) and ``merging`` (merge and unmerge)."""

    def __init__(self, device: torch.device, clock):
        self.device = device
        self.clock = clock
        self.reset()

    def reset(self) -> None:
        self.seconds = {"plan": 0.0, "merging": 0.0}
        self.plans = 0  # plan computations (sdmerge MergedBlock._new_plan, tomesd compute_merge that merges)

    def _counted(self, function):
        def wrapper(*args, **kwargs):
            self.plans += 1
            return function(*args, **kwargs)

        return wrapper

    def _timed(self, function, kind: str):
        def wrapper(*args, **kwargs):
            synchronize(self.device)
            start = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize(self.device)
                self.seconds[kind] += self.clock() - start

        return wrapper

    def _timed_tomesd_plan(self, compute_merge):
        """tomesd's ``compute_merge``, timed as a plan, returning timed merge/unmerge functions."""
        timed = self._timed(compute_merge, "plan")

        def wrapper(*args, **kwargs):
            functions = timed(*args, **kwargs)
            self.plans += functions[0] is not tomesd.merge.do_nothing  # blocks it does not merge get do_nothing
            return tuple(f if f is tomesd.merge.do_nothing else self._timed(f, "merging") for f in functions)

        return wrapper

    @contextlib.contextmanager
    def installed(self):
        targets = [
            (MergedBlock, "_plan", lambda f: self._timed(f, "plan")),
            (MergedBlock, "_new_plan", self._counted),
            (sdmerge.diffusion.prompt_importance, "prompt_attention_mass", lambda f: self._timed(f, "plan")),
            (MergePlan, "merge", lambda f: self._timed(f, "merging")),
            (MergePlan, "unmerge", lambda f: self._timed(f, "merging")),
            (tomesd.patch, "compute_merge", self._timed_tomesd_plan),
        ]
        originals = [(owner, name, getattr(owner, name), wrap) for owner, name, wrap in targets]
        for owner, name, function, wrap in originals:
            setattr(owner, name, wrap(function))
        try:
            yield self
        finally:
            for owner, name, function, _ in originals:
                setattr(owner, name, function)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.machine()


def load_unet(path: str | None, dtype: torch.dtype, device: torch.device) -> UNet2DConditionModel:
    if path is None:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    elif os.path.isdir(os.path.join(path, "unet")):
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    else:
        unet = UNet2DConditionModel.from_pretrained(path)
    return unet.to(device=device, dtype=dtype).eval()


def time_step(unet, setting: Setting, inputs, device: torch.device, timer: OverheadTimer) -> float:
    """Seconds of one UNet call; ``timer.seconds`` holds the work merging added to it."""
    sample, context = inputs
    if setting.method == "cis":  # a first call, untimed, so that the timed one has a prompt mass
        unet(sample, 501, context)
    timer.reset()
    synchronize(device)
    start = timer.clock()
    unet(sample, 500, context)
    synchronize(device)
    return timer.clock() - start


def make_inputs(unet, side: int, batch: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise [batch, 4, side / 8, side / 8], prompt embeddings [batch, 77, C])``, seeded by ``side``."""
    generator = torch.Generator().manual_seed(side)
    latent = side // 8
    sample = torch.randn(batch, 4, latent, latent, generator=generator).to(device=device, dtype=dtype)
    context = torch.randn(batch, PROMPT_TOKENS, unet.config.cross_attention_dim, generator=generator)
    return sample, context.to(device=device, dtype=dtype)


def run_resolution(
    unet,
    side: int,
    repetitions: int,
    dtype,
    device,
    clock=time.perf_counter,
    methods=METHODS,
    keep_rates=(0.5, 0.4),
    batch: int | None = None,
    table: list[Setting] | None = None,
) -> list[Setting]:
    """Time one UNet call at ``side x side`` pixels for every setting of ``table`` (default
    :func:`settings`), interleaved, once per repetition after one untimed unpatched call.
    ``batch``: the UNet batch (default :data:`RESOLUTIONS`). Returns the settings with their times."""
    inputs = make_inputs(unet, side, RESOLUTIONS[side] if batch is None else batch, dtype, device)
    table = settings(methods, keep_rates) if table is None else table
    return run_interleaved(
        unet, side, table, repetitions, OverheadTimer(device, clock),
        warm_up=lambda timer: time_step(unet, Setting("unpatched", "none"), inputs, device, timer),
        timed=lambda setting, timer: time_step(unet, setting, inputs, device, timer),
    )


def run_interleaved(
    unet, side: int, table: list[Setting], repetitions: int, timer: OverheadTimer, warm_up, timed, rotate: bool = False
):
    """Every setting of ``table`` once per repetition, in turn, after one untimed ``warm_up(timer)``
    of the unpatched UNet: ``timed(setting, timer) -> seconds`` with the setting patched in.
    ``rotate``: repetition ``i`` starts at setting ``i`` of the table (a drift of the machine's
    speed within repetitions then falls on every setting in turn, not always on the last ones).
    Leaves the UNet unpatched; returns ``table`` with its times."""
    with torch.no_grad(), timer.installed():
        table[0].patch(unet)
        print(f"  {side}px warm-up {warm_up(timer):8.3f} s", flush=True)
        for repetition in range(1, repetitions + 1):
            start = (repetition - 1) % len(table) if rotate else 0
            for setting in table[start:] + table[:start]:
                setting.patch(unet)
                seconds = timed(setting, timer)
                setting.record(seconds, timer)
                print(
                    f"  {side}px rep {repetition} {setting.label:<45} {seconds:8.3f} s, {timer.plans} plans",
                    flush=True,
                )
    tomesd.remove_patch(unet)
    sdmerge.remove(unet)
    return table


def paired_ratio(ours: list[float], theirs: list[float]) -> str:
    """``median (min-max)`` of the per-repetition ratios ``ours[i] / theirs[i]``."""
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"


def markdown(side: int, table: list[Setting], clock: str, batch: int | None = None, reference: str | None = None) -> str:
    """The step (and modes) table; ``reference``: the label of an arm every arm gets a paired ratio to."""
    base = statistics.median(table[0].times)
    tomesd_runs = {(s.keep_rate, tuple(sorted(s.options.items()))): s for s in table if s.library == "tomesd"}
    compared = next((s for s in table if s.label == reference), None)

    def share(times: list[float], setting: Setting) -> str:
        return f"{100 * statistics.median(t / step for t, step in zip(times, setting.times)):.1f}%"

    lines = [
        f"| {side}x{side}, batch {RESOLUTIONS[side] if batch is None else batch} | median {clock} s/step "
        "| vs unpatched "
        "| sdmerge tome / tomesd: step (range) | plan share | merge/unmerge share "
        "| sdmerge tome / tomesd: added work (range) |" + ("" if compared is None else f" vs {reference} (range) |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + ("" if compared is None else " ---: |"),
    ]
    for setting in table:
        median = statistics.median(setting.times)
        cells = [setting.label, f"{median:.3f}", f"{median / base:.3f}", "", "", "", ""]
        if compared is not None:
            cells.append(paired_ratio(setting.times, compared.times))
        if setting.library != "none":
            cells[4], cells[5] = share(setting.plan_times, setting), share(setting.merging_times, setting)
        theirs = tomesd_runs.get((setting.keep_rate, tuple(sorted(setting.options.items()))))
        if setting.library == "sdmerge" and setting.method == "tome" and theirs is not None:  # paired per repetition
            cells[3] = paired_ratio(setting.times, theirs.times)
            cells[6] = paired_ratio(
                [p + m for p, m in zip(setting.plan_times, setting.merging_times)],
                [p + m for p, m in zip(theirs.plan_times, theirs.merging_times)],
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pndm_timesteps(calls: int) -> list[int]:
    """The first ``calls`` timesteps of SD-1.5's default scheduler (PNDM, 50 steps)."""
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(INFERENCE_STEPS)
    if not 1 <= calls <= len(scheduler.timesteps):
        raise ValueError(f"calls={calls}: a generation has 1..{len(scheduler.timesteps)} UNet calls")
    return [int(t) for t in scheduler.timesteps[:calls]]


def time_generation(unet, calls: int, inputs, device: torch.device, timer: OverheadTimer) -> float:
    """Seconds of the first ``calls`` UNet calls of a generation from ``inputs = (noise [B, 4, h, w],
    prompt embeddings [B, T, C])``: each call at the next PNDM timestep on the sample the
    scheduler's step made from the previous output; ``timer`` holds the work merging added."""
    sample, context = inputs
    scheduler = PNDMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(INFERENCE_STEPS, device=device)
    timesteps = scheduler.timesteps[:calls]
    timer.reset()
    synchronize(device)
    start = timer.clock()
    for t in timesteps:
        noise = unet(sample, t, context).sample
        sample = scheduler.step(noise, t, sample).prev_sample
    synchronize(device)
    return timer.clock() - start


def run_generation(
    unet,
    side: int,
    repetitions: int,
    dtype,
    device,
    clock=time.perf_counter,
    calls: int = 5,
    table: list[Setting] | None = None,
    batch: int | None = None,
) -> list[Setting]:
    """Time ``calls`` UNet calls of a generation at ``side x side`` pixels (latent ``side / 8``)
    for every setting of ``table`` (default :func:`generation_settings`), interleaved, once per
    repetition after one untimed unpatched call. ``batch``: the UNet batch (default
    :data:`RESOLUTIONS`). Returns the settings with their times."""
    pndm_timesteps(calls)  # checks calls
    inputs = make_inputs(unet, side, RESOLUTIONS[side] if batch is None else batch, dtype, device)
    return run_interleaved(
        unet, side, generation_settings() if table is None else table, repetitions, OverheadTimer(device, clock),
        warm_up=lambda timer: time_generation(unet, 1, inputs, device, timer),
        timed=lambda setting, timer: time_generation(unet, calls, inputs, device, timer),
    )


def generation_markdown(side: int, table: list[Setting], clock: str, calls: int, batch: int | None = None) -> str:
    """The generation mode's table: one row per setting; the first setting is the unpatched
    baseline, the first ``tomesd`` setting the tomesd reference."""
    base = table[0]
    reference = next(s for s in table if s.library == "tomesd")
    batch = RESOLUTIONS[side] if batch is None else batch
    lines = [
        f"| {side}x{side}, batch {batch}, {calls} calls | median {clock} s/generation | vs unpatched (range) "
        "| vs tomesd (range) | plan share | plans per generation |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting in table:
        plan_share = statistics.median(p / t for p, t in zip(setting.plan_times, setting.times))
        cells = [
            setting.label,
            f"{statistics.median(setting.times):.3f}",
            "1" if setting is base else paired_ratio(setting.times, base.times),
            "1" if setting is reference else paired_ratio(setting.times, reference.times),
            "" if setting.library == "none" else f"{100 * plan_share:.1f}%",
            "" if setting.library == "none" else f"{statistics.median(setting.plans):g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", help="local diffusers UNet or pipeline directory (default: random SD-1.5 weights)")
    parser.add_argument("--resolutions", type=int, nargs="+", choices=sorted(RESOLUTIONS), default=sorted(RESOLUTIONS))
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument(
        "--mode",
        choices=("step", "generation", "modes"),
        default="step",
        help="step: one UNet call per configuration (default); generation: --calls consecutive calls at "
        "PNDM's timesteps, with the plan-reuse arms; modes: one call per arm of the merging modes "
        "(merge_crossattn / merge_mlp against tomesd, kv_only, grid)",
    )
    parser.add_argument("--calls", type=int, default=5, help="UNet calls per generation (generation mode; default 5)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="sdmerge methods to time")
    parser.add_argument("--quick", action="store_true", help="512x512 only, 1 repetition")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (CPU only, meaningful with --threads 1: "
        "on a machine shared with other jobs it leaves out the time spent waiting for a core)",
    )
    args = parser.parse_args()
    require(tomesd)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    if args.quick:
        args.resolutions, args.repetitions = [512], 1
    if args.repetitions < 1:
        parser.error(f"--repetitions {args.repetitions}: must be at least 1")
    try:
        pndm_timesteps(args.calls)
    except ValueError as error:
        parser.error(f"--calls: {error}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    unet = load_unet(args.unet, dtype, device)
    processor = type(next(iter(unet.attn_processors.values()))).__name__
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"torch {torch.__version__}, {machine}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"attention processor {processor}, weights {'random SD-1.5 config' if args.unet is None else args.unet}, "
        f"{args.repetitions} interleaved repetitions after 1 warm-up, {args.clock} clock, {args.mode} mode"
        + (f" ({args.calls} calls at PNDM timesteps {pndm_timesteps(args.calls)})" if args.mode == "generation" else "")
        + f"; load average {os.getloadavg()}",
        flush=True,
    )
    clock = CLOCKS[args.clock]
    if args.mode == "generation":
        tables = [
            (side, run_generation(unet, side, args.repetitions, dtype, device, clock, args.calls))
            for side in args.resolutions
        ]
    else:
        tables = [  # a fresh table of settings (they keep their times) per resolution
            (side, run_resolution(
                unet, side, args.repetitions, dtype, device, clock, args.methods,
                table=modes_settings() if args.mode == "modes" else None,
            ))
            for side in args.resolutions
        ]
    print(f"load average at the end {os.getloadavg()}\n")
    for side, table in tables:
        if args.mode == "generation":
            print(generation_markdown(side, table, args.clock, args.calls), end="\n\n")
        else:
            print(markdown(side, table, args.clock, reference=REFERENCE if args.mode == "modes" else None), end="\n\n")


if __name__ == "__main__":
    main()
