"""One-shot GPU benchmark: the UNet, clustering and ViT figures of docs/benchmarks.md on one GPU, in one run, as markdown.

Sections, each timed by the project's own benchmark code (nothing here re-implements a timer):

1. Stable Diffusion UNet (``bench_unet``; SD-1.5's real widths, random weights, default
   attention processor, i.e. torch SDPA): one step for the unpatched UNet, tomesd ratio 0.6 and
   every sdmerge method at r=0.4 (step mode), and the first ``--calls`` UNet calls of a
   generation at PNDM's timesteps for the generation arms (unpatched, tomesd ratio 0.6,
   ``tome``, ``atc_average``, ``atc_average`` with ``share_plans`` / ``plan_every=5`` / both),
   and one step for the arms of the merging modes (``bench_unet.modes_settings``: tomesd and
   sdmerge with ``merge_crossattn`` / ``merge_mlp``, ``kv_only`` ``tome`` and ``grid``);
   512x512 batch 2 and 1024x1024 batch 1.
2. ``sdmerge.cluster`` (``bench_clustering.run_case``): milliseconds per call at N=4096, B=2,
   keep 0.4, D=320 (SD-1.5's top-level width), each linkage and both paths, with rounds, aten
   operations and host synchronisations per round, and the partitions checked against scipy.
3. ViT/DeiT throughput (``bench_vit``): DeiT-S and ViT-B at batch 256 for ``tome``,
   ``atc_average`` and ``cis`` under ToMe's 13 tokens per block and the stage protocol.
4. Diffusion transformers (``bench_dit``, issues 21 and 22): SD3-Medium, PixArt-Sigma and
   FLUX.1-dev at their real widths and full depth (24, 28 and 19 + 38 blocks), random weights,
   batch 2 (FLUX.1-dev: 1), 1024x1024 and 512x512: unpatched, ``tome`` r=0.5 (self-attention,
   and with ``merge_mlp``), ``grid`` r=0.25 with ``kv_only``, ``atc_average`` r=0.5 with
   ``share_plans, plan_every=5``, and for Flux pyramid attention broadcast alone and on top of
   ``tome`` and ``grid``, each timed over the first ``calls`` calls of a generation, beside the
   bound from counted FLOPs.

On a GPU machine without a package registry (it has torch, transformers, scipy; not diffusers,
tomesd or fastcluster), bring their wheels along and install them without dependencies in the
same command:

    pip download --no-deps -d wheels diffusers==0.42.1 tomesd==0.1.3 fastcluster==1.3.0  # here
    pip install --no-deps wheels/*.whl && python scripts/bench_gpu.py        # there

The markdown (GPU, driver, CUDA, torch, dtype, attention backend, then one table per section)
is printed and written to ``--out`` (default ``outputs/bench_gpu.md``; the last line printed says
where). ``--device cpu --quick`` runs the same code end to end at tiny sizes (SD-1.5's block
layout at small widths, 256 tokens, a 2-block ViT, 4-block SD3, PixArt and Flux at tiny widths on
64 tokens) in about a minute: it checks the script, its numbers mean nothing. Timing notes: the
UNet sections synchronise the device around each plan and merge call (``bench_unet.OverheadTimer``,
for the plan share), the same for every arm, and the DiT section around every block (for its
parts of a step); everything runs interleaved and after warm-up calls.

The step table and the merging-modes table both time the unpatched UNet at the same size, each
in its own interleaved run, and every ratio compares arms of one run. The two unpatched times
should agree; the report prints both, and says so when they differ by more than
:data:`DRIFT`: the machine's speed changed between the runs (other processes, clocks; on a CPU,
torch's threads stall whenever another process holds a core: a quick run on a busy 2-core machine
showed 9.8 s and 0.30 s for a step that takes 0.04 s on an idle one), so compare times within a
table only.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/

import bench_clustering  # noqa: E402
import bench_dit  # noqa: E402
import bench_unet  # noqa: E402
import bench_vit  # noqa: E402
from eval.optional import require  # noqa: E402
from eval.vit_variants import Variant  # noqa: E402

SD_METHODS = ("tome", "atc_single", "atc_complete", "atc_average", "cis", "crucial")
VIT_METHODS = ("tome", "atc_average", "cis")
LINKAGES = ("single", "complete", "average")
KEEP_RATE = 0.4
DRIFT = 1.5  # the ratio of the two unpatched step times above which the report warns

FULL = dict(
    unet_widths=None,  # SD-1.5's own (320, 640, 1280, 1280)
    sides={512: 2, 1024: 1},
    repetitions=3,
    calls=5,
    cluster=dict(tokens=4096, batch=2, dim=320, repeats=5),
    vit_models=("DeiT-S", "ViT-B"),
    vit_blocks=12,
    vit_batch=256,
    vit_repetitions=5,
    dit=dict(sides=(1024, 512), blocks=None, batch=None, repetitions=3, calls=5, quick=False),  # None: all, each model's
)
QUICK = dict(
    unet_widths=(32, 64, 64, 64),
    sides={128: 2},
    repetitions=1,
    calls=2,
    cluster=dict(tokens=256, batch=2, dim=32, repeats=1),
    vit_models=("DeiT-S",),
    vit_blocks=2,
    vit_batch=4,
    vit_repetitions=1,
    dit=dict(sides=(bench_dit.QUICK_SIDE,), blocks=4, batch=None, repetitions=1, calls=5, quick=True),
)


def environment(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Markdown lines naming the machine, driver, library versions and dtype."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
        driver = "unknown (nvidia-smi not found)"
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"]
            driver = subprocess.run(query, capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        accelerator = f"{machine}, driver {driver}, CUDA {torch.version.cuda}"
    else:
        accelerator = f"no GPU: {bench_unet.cpu_name()}, {torch.get_num_threads()} torch threads"
    versions = ", ".join(
        f"{name} {importlib.metadata.version(name)}" for name in ("torch", "diffusers", "transformers", "tomesd", "scipy")
    )
    return [
        f"- machine: {accelerator}",
        f"- {versions}",
        f"- dtype {str(dtype).removeprefix('torch.')}; attention: diffusers AttnProcessor2_0 and transformers "
        "'sdpa' (torch.nn.functional.scaled_dot_product_attention)",
        f"- run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: "
        + " ".join(sys.argv),
    ]


def unet_sections(device, dtype, sizes: dict) -> list[str]:
    """Step and generation tables at every side of ``sizes['sides']``."""
    torch.manual_seed(0)
    config = dict(bench_unet.SD15_UNET_CONFIG)
    if sizes["unet_widths"] is not None:
        config.update(block_out_channels=sizes["unet_widths"], norm_num_groups=16)
    unet = bench_unet.UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval()
    lines = []
    for side, batch in sizes["sides"].items():
        print(f"UNet step, {side}px batch {batch}", flush=True)
        steps = bench_unet.run_resolution(
            unet, side, sizes["repetitions"], dtype, device, methods=SD_METHODS, keep_rates=(KEEP_RATE,), batch=batch
        )
        lines += ["", bench_unet.markdown(side, steps, "wall", batch=batch)]
        print(f"UNet generation, {side}px batch {batch}, {sizes['calls']} calls", flush=True)
        generation = bench_unet.run_generation(
            unet, side, sizes["repetitions"], dtype, device, calls=sizes["calls"], batch=batch
        )
        lines += ["", bench_unet.generation_markdown(side, generation, "wall", sizes["calls"], batch=batch)]
        print(f"UNet merging modes, {side}px batch {batch}", flush=True)
        modes = bench_unet.run_resolution(
            unet, side, sizes["repetitions"], dtype, device, batch=batch, table=bench_unet.modes_settings()
        )
        lines += ["", bench_unet.markdown(side, modes, "wall", batch=batch, reference=bench_unet.REFERENCE)]
        lines += ["", unpatched_agreement(side, steps[0].times, modes[0].times)]
    return lines


def unpatched_agreement(side: int, step_times: list[float], modes_times: list[float]) -> str:
    """A note comparing the unpatched step of the step table with that of the modes table (see
    the module docstring), with a warning when they differ by more than :data:`DRIFT`."""
    first, second = statistics.median(step_times), statistics.median(modes_times)
    note = (
        f"Each table is its own interleaved run, and its ratios compare arms of that run. The unpatched step "
        f"at {side}x{side}: {first:.3f} s in the step table, {second:.3f} s in the modes table"
    )
    if max(first, second) > DRIFT * min(first, second):
        return note + (
            f". **They differ by {max(first, second) / min(first, second):.1f}x: the machine's speed changed "
            "between the runs (other processes, clocks; on a CPU, torch's threads stall while another process "
            "holds a core); compare times within a table only.**"
        )
    return note + "."


def cluster_section(device, sizes: dict) -> list[str]:
    """``sdmerge.cluster`` per linkage and path, against the authors' scipy path."""
    case = sizes["cluster"]
    lines = [
        "",
        f"`sdmerge.cluster`, N={case['tokens']}, B={case['batch']}, keep {KEEP_RATE}, D={case['dim']}, "
        f"float32 metric, median of {case['repeats']} calls",
        "",
        "| linkage | path | ms per call | authors' path ms | rounds | aten ops per round | host syncs per round "
        "| same as scipy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for linkage in LINKAGES:
        print(f"cluster, {linkage} linkage", flush=True)
        rows = bench_clustering.run_case(
            case["tokens"], case["batch"], KEEP_RATE, linkage, case["dim"], case["repeats"], device,
            bench_clustering.PATHS,
        )
        for row in rows:
            lines.append(
                f"| {linkage} | {row['path']} | {row['sdmerge_ms']:.2f} | {row['authors_ms']:.1f} | {row['rounds']} "
                f"| {row['aten_ops_per_round']:.1f} | {row['host_syncs_per_round']:.2f} "
                f"| {'yes' if row['same_as_scipy'] else 'NO'} |"
            )
    return lines


def vit_section(device, dtype, sizes: dict) -> list[str]:
    """Images per second of every method and schedule, and the ratio to the unpatched model."""
    lines = [
        "",
        f"ViT/DeiT, batch {sizes['vit_batch']}, 224x224, {sizes['vit_blocks']} blocks, random weights, "
        f"median of {sizes['vit_repetitions']} interleaved repetitions",
        "",
        "| model | variant | images/s | vs unpatched |",
        "| --- | --- | ---: | ---: |",
    ]
    for name in sizes["vit_models"]:
        print(f"ViT throughput, {name}", flush=True)
        model = bench_vit.build(name, "sdpa", num_hidden_layers=sizes["vit_blocks"]).to(device=device, dtype=dtype)
        settings = bench_vit.SETTINGS if sizes["vit_blocks"] == 12 else ({"tokens_per_block": 13},)
        variants = [Variant(None)] + [Variant(m, s) for m in VIT_METHODS for s in settings]
        times = bench_vit.benchmark(model, variants, sizes["vit_batch"], sizes["vit_repetitions"], "wall")
        baseline = statistics.median(times[0])
        for variant, seconds in zip(variants, times, strict=True):
            median = statistics.median(seconds)
            lines.append(f"| {name} | {variant.label} | {sizes['vit_batch'] / median:.1f} | {baseline / median:.2f} |")
    return lines


def dit_section(device, dtype, sizes: dict) -> list[str]:
    """SD3-Medium, PixArt-Sigma and FLUX.1-dev (``bench_dit``): every arm's speed-up beside its FLOP bound."""
    case = sizes["dit"]
    results = bench_dit.measure(
        bench_dit.MODELS, case["sides"], case["blocks"], case["batch"], case["repetitions"], case["calls"],
        case["quick"], dtype, device,
    )
    return bench_dit.report(results, ("wall",), case["quick"], goals=False)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="default: float16 on a GPU, float32 on the CPU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script end to end")
    parser.add_argument("--out", default="outputs/bench_gpu.md", help="markdown file to write")
    args = parser.parse_args(argv)
    require(bench_unet.tomesd, bench_clustering.hierarchy, bench_clustering.distance)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu --quick to check the script)")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    sizes = QUICK if args.quick else FULL

    lines = ["# sdmerge GPU benchmark" + (" (quick: tiny sizes, the numbers mean nothing)" if args.quick else ""), ""]
    lines += environment(device, dtype)
    lines += ["", "## Stable Diffusion UNet (SD-1.5 layout, random weights)"] + unet_sections(device, dtype, sizes)
    lines += ["", "## Exact ATC clustering"] + cluster_section(device, sizes)
    lines += ["", "## ViT/DeiT throughput"] + vit_section(device, dtype, sizes)
    lines += ["", "## Diffusion transformers (SD3-Medium, PixArt-Sigma, FLUX.1-dev; random weights)"]
    lines += dit_section(device, dtype, sizes)
    report = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print("\n" + report, flush=True)
    print(f"written to {out.resolve()}", flush=True)
    return report


if __name__ == "__main__":
    main()
