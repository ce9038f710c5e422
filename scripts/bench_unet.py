"""Benchmark: one UNet step of SD-1.5, unpatched vs tomesd vs sdmerge.

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

Weights: random, from SD-1.5's UNet config (no download), unless ``--unet`` names a local
diffusers UNet directory or a pipeline directory (loaded with ``from_pretrained``).

    python scripts/bench_unet.py                          # 512 and 1024, 3 repetitions
    python scripts/bench_unet.py --quick                  # 512 only, 1 repetition
    python scripts/bench_unet.py --resolutions 1024 --repetitions 1 --threads 1 --clock cpu
    python scripts/bench_unet.py --methods tome --repetitions 7 --threads 1 --clock cpu
    python scripts/bench_unet.py --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import tomesd
import tomesd.merge
import tomesd.patch
import torch
from diffusers import UNet2DConditionModel

import sdmerge
import sdmerge.prompt_importance
from sdmerge.core import MergePlan
from sdmerge.stable_diffusion import MergedBlock

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
RESOLUTIONS = {512: 2, 1024: 1}  # image side -> UNet batch
PROMPT_TOKENS = 77


@dataclass
class Setting:
    """One configuration of the UNet, timed in every repetition."""

    label: str
    library: str  # "none" | "tomesd" | "sdmerge"
    method: str | None = None
    keep_rate: float | None = None
    times: list[float] = field(default_factory=list)
    plan_times: list[float] = field(default_factory=list)
    merging_times: list[float] = field(default_factory=list)

    def patch(self, unet: UNet2DConditionModel) -> None:
        tomesd.remove_patch(unet)
        sdmerge.remove(unet)
        if self.library == "tomesd":
            tomesd.apply_patch(unet, ratio=round(1 - self.keep_rate, 6))
        elif self.library == "sdmerge":
            sdmerge.apply(unet, self.method, r=self.keep_rate)


METHODS = ("tome", "atc_average", "cis")


def settings(methods=METHODS, keep_rates=(0.5, 0.4)) -> list[Setting]:
    out = [Setting("unpatched", "none")]
    for keep_rate in keep_rates:
        out.append(Setting(f"tomesd ratio={1 - keep_rate:.1f}", "tomesd", "tome", keep_rate))
        for method in methods:
            out.append(Setting(f"sdmerge {method} r={keep_rate}", "sdmerge", method, keep_rate))
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
            return tuple(f if f is tomesd.merge.do_nothing else self._timed(f, "merging") for f in functions)

        return wrapper

    @contextlib.contextmanager
    def installed(self):
        targets = [
            (MergedBlock, "merge_plan", lambda f: self._timed(f, "plan")),
            (sdmerge.prompt_importance, "prompt_attention_mass", lambda f: self._timed(f, "plan")),
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


def run_resolution(
    unet, side: int, repetitions: int, dtype, device, clock=time.perf_counter, methods=METHODS,
    keep_rates=(0.5, 0.4), batch: int | None = None,
) -> list[Setting]:
    """Time every setting at ``side`` x ``side`` (batch: ``RESOLUTIONS[side]`` unless given)."""
    batch = RESOLUTIONS[side] if batch is None else batch
    generator = torch.Generator().manual_seed(side)
    latent = side // 8
    sample = torch.randn(batch, 4, latent, latent, generator=generator).to(device=device, dtype=dtype)
    context = torch.randn(batch, PROMPT_TOKENS, unet.config.cross_attention_dim, generator=generator)
    inputs = (sample, context.to(device=device, dtype=dtype))
    table = settings(methods, keep_rates)
    timer = OverheadTimer(device, clock)
    with torch.no_grad(), timer.installed():
        table[0].patch(unet)
        print(f"  {side}px warm-up {time_step(unet, table[0], inputs, device, timer):8.3f} s", flush=True)
        for repetition in range(1, repetitions + 1):
            for setting in table:
                setting.patch(unet)
                seconds = time_step(unet, setting, inputs, device, timer)
                setting.times.append(seconds)
                setting.plan_times.append(timer.seconds["plan"])
                setting.merging_times.append(timer.seconds["merging"])
                print(f"  {side}px rep {repetition} {setting.label:<26} {seconds:8.3f} s", flush=True)
    tomesd.remove_patch(unet)
    sdmerge.remove(unet)
    return table


def markdown(side: int, table: list[Setting], clock: str) -> str:
    base = statistics.median(table[0].times)
    tomesd_runs = {s.keep_rate: s for s in table if s.library == "tomesd"}

    def paired(ours: list[float], theirs: list[float]) -> str:
        ratios = [a / b for a, b in zip(ours, theirs)]
        return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"

    def share(times: list[float], setting: Setting) -> str:
        return f"{100 * statistics.median(t / step for t, step in zip(times, setting.times)):.1f}%"

    lines = [
        f"| {side}x{side}, batch {RESOLUTIONS[side]} | median {clock} s/step | vs unpatched "
        "| sdmerge tome / tomesd: step (range) | plan share | merge/unmerge share "
        "| sdmerge tome / tomesd: added work (range) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting in table:
        median = statistics.median(setting.times)
        cells = [setting.label, f"{median:.3f}", f"{median / base:.3f}", "", "", "", ""]
        if setting.library != "none":
            cells[4], cells[5] = share(setting.plan_times, setting), share(setting.merging_times, setting)
        if setting.library == "sdmerge" and setting.method == "tome":  # paired within each repetition
            theirs = tomesd_runs[setting.keep_rate]
            cells[3] = paired(setting.times, theirs.times)
            cells[6] = paired(
                [p + m for p, m in zip(setting.plan_times, setting.merging_times)],
                [p + m for p, m in zip(theirs.plan_times, theirs.merging_times)],
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unet", help="local diffusers UNet or pipeline directory (default: random SD-1.5 weights)")
    parser.add_argument("--resolutions", type=int, nargs="+", choices=sorted(RESOLUTIONS), default=sorted(RESOLUTIONS))
    parser.add_argument("--repetitions", type=int, default=3)
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
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        parser.error("--clock cpu needs --device cpu and --threads 1")
    if args.quick:
        args.resolutions, args.repetitions = [512], 1
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    unet = load_unet(args.unet, dtype, device)
    processor = type(next(iter(unet.attn_processors.values()))).__name__
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"torch {torch.__version__}, {machine}, {torch.get_num_threads()} threads, {args.dtype}, "
        f"attention processor {processor}, weights {'random SD-1.5 config' if args.unet is None else args.unet}, "
        f"{args.repetitions} interleaved repetitions after 1 warm-up, {args.clock} clock; "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    tables = [
        (side, run_resolution(unet, side, args.repetitions, dtype, device, CLOCKS[args.clock], args.methods))
        for side in args.resolutions
    ]
    print(f"load average at the end {os.getloadavg()}\n")
    for side, table in tables:
        print(markdown(side, table, args.clock), end="\n\n")


if __name__ == "__main__":
    main()
