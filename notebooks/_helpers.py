"""What the two notebooks share, so that their cells stay short.

Timing comes from the project's benchmark scripts (``scripts/bench_unet.py``,
``scripts/bench_clustering.py``, ``scripts/bench_vit.py``): this module only chooses their
settings, collects their results into rows and plots them. Importing it puts the repository
root and ``scripts/`` first on ``sys.path``, so the notebooks run the checkout they live in.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT / "scripts", ROOT):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import diffusers  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel  # noqa: E402

import bench_clustering  # noqa: E402
import bench_unet  # noqa: E402
import bench_vit  # noqa: E402
import sdmerge  # noqa: E402
from sdmerge.plan_recording import record_plans, vit_provenance_after  # noqa: E402
from sdmerge.visualize import paint_groups, token_labels  # noqa: E402
from eval.vit_variants import Variant  # noqa: E402

QUICK_UNET_WIDTHS = (32, 64, 64, 64)
"""QUICK mode's UNet: SD-1.5's layout (blocks, heads, prompt width 768) at these channel widths."""


# --- environment -------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    """The accelerator's name, or the CPU model and core count."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else bench_unet.cpu_name()


def print_environment(device: torch.device, dtype: torch.dtype, unet=None) -> None:
    """Machine, threads, dtype, attention backend and library versions, as the notebook ran."""
    lines = {
        "machine": machine(device),
        "device": str(device),
        "torch threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "tomesd": importlib.metadata.version("tomesd"),
        "sdmerge": sdmerge.__version__,
        "load average (1, 5, 15 min)": os.getloadavg(),
    }
    if unet is not None:
        processor = type(next(iter(unet.attn_processors.values()))).__name__
        backend = "torch.nn.functional.scaled_dot_product_attention"
        if device.type == "cuda":
            backend += (
                f" (flash {torch.backends.cuda.flash_sdp_enabled()}, "
                f"memory-efficient {torch.backends.cuda.mem_efficient_sdp_enabled()})"
            )
        lines["UNet attention"] = f"{processor} -> {backend}"
    lines["ViT attention"] = "transformers attn_implementation='sdpa'"
    width = max(map(len, lines))
    for key, value in lines.items():
        print(f"{key:<{width}}  {value}")


def save(figure, name: str, figure_dir) -> None:
    """Write ``figure`` as ``<figure_dir>/<name>.png`` (the README embeds these); ``None``: don't."""
    if figure_dir is not None:
        Path(figure_dir).mkdir(parents=True, exist_ok=True)
        figure.savefig(Path(figure_dir) / f"{name}.png", dpi=90, bbox_inches="tight")


# --- Stable Diffusion UNet step time (bench_unet) -------------------------------------------------


def sd_unet(model_path, quick: bool, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """A local model (``model_path``), else random weights: SD-1.5's UNet (``QUICK=False``) or
    its layout at :data:`QUICK_UNET_WIDTHS`."""
    if model_path is not None or not quick:
        return bench_unet.load_unet(model_path, dtype, device)
    torch.manual_seed(0)
    config = {**bench_unet.SD15_UNET_CONFIG, "block_out_channels": QUICK_UNET_WIDTHS}
    unet = UNet2DConditionModel(**config).eval()
    return unet if (device.type, dtype) == ("cpu", torch.float32) else unet.to(device=device, dtype=dtype)


def unet_rows(unet, sides, methods, keep_rates, repetitions: int, device, dtype) -> list[dict]:
    """Median seconds per UNet step (batch 1) for every setting of ``bench_unet.run_resolution``
    at every side, with the speedup over the unpatched UNet of the same run."""
    rows = []
    for side in sides:
        table = bench_unet.run_resolution(
            unet, side, repetitions, dtype, device, methods=methods, keep_rates=keep_rates, batch=1
        )
        base = statistics.median(table[0].times)
        for setting in table:
            median = statistics.median(setting.times)
            name = {"none": "unpatched", "tomesd": "tomesd"}.get(setting.library, setting.method)
            rows.append({
                "side": side, "arm": name, "keep_rate": setting.keep_rate, "seconds": median,
                "speedup": base / median, "plan share": statistics.median(
                    p / t for p, t in zip(setting.plan_times, setting.times)),
            })
    return rows


def generation_rows(unet, side: int, calls: int, repetitions: int, device, dtype, keep_rate: float = 0.4) -> list[dict]:
    """``bench_unet.run_generation``: ``calls`` consecutive UNet calls of a generation (batch 1)
    for its arms (unpatched, tomesd, tome, atc_average, and atc_average with plan reuse)."""
    table = bench_unet.generation_settings(keep_rate)
    bench_unet.run_generation(unet, side, repetitions, dtype, device, calls=calls, table=table, batch=1)
    base = statistics.median(table[0].times)
    return [
        {"arm": setting.label, "seconds": statistics.median(setting.times),
         "speedup": base / statistics.median(setting.times),
         "plans": statistics.median(setting.plans) if setting.library != "none" else 0}
        for setting in table
    ]


def plot_bars(rows, title: str):
    """Horizontal bars of ``row["speedup"]`` per arm."""
    figure, axis = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1))
    labels = [row["arm"] for row in rows][::-1]
    axis.barh(labels, [row["speedup"] for row in rows][::-1], color="tab:blue")
    axis.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set(title=title, xlabel="speedup over unpatched")
    axis.grid(alpha=0.3, axis="x")
    return figure


def bars_reading(rows) -> str:
    best = max(rows, key=lambda row: row["speedup"])
    parts = ", ".join(f"{row['arm']} {row['speedup']:.2f}x" for row in rows if row["arm"] != "unpatched")
    return f"Reading (measured in this run): {parts}; fastest: {best['arm']}."


def print_rows(rows: list[dict], columns: list[str]) -> None:
    formatted = [{c: f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns} for row in rows]
    bench_vit.print_table(formatted, columns)


def plot_lines(rows, x: str, y: str, title: str, xlabel: str, ylabel: str, log_y: bool = False, baseline=None):
    """One line per arm (``row["arm"]``) of ``y`` against ``x``."""
    figure, axis = plt.subplots(figsize=(6.4, 4))
    arms = list(dict.fromkeys(row["arm"] for row in rows if row["arm"] != "unpatched" or baseline is None))
    for arm in arms:
        points = sorted((row[x], row[y]) for row in rows if row["arm"] == arm and row[x] is not None)
        if points:
            axis.plot(*zip(*points), marker="o", label=arm)
    if baseline is not None:
        axis.axhline(baseline, color="grey", linestyle="--", linewidth=1, label="unpatched")
    if log_y:
        axis.set_yscale("log")
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def speedup_reading(rows, x: str, what: str) -> str:
    """One sentence from the measured rows: every arm's speedup at the smallest and largest
    ``x``, and the fastest arm at the largest (printed by the notebooks under each figure)."""
    xs = sorted({row[x] for row in rows if row[x] is not None})
    arms = list(dict.fromkeys(row["arm"] for row in rows if row["arm"] != "unpatched"))

    def at(arm, value):
        return next(row["speedup"] for row in rows if row["arm"] == arm and row[x] == value)

    parts = ", ".join(f"{arm} {at(arm, xs[0]):.2f}x -> {at(arm, xs[-1]):.2f}x" for arm in arms)
    fastest = max(arms, key=lambda arm: at(arm, xs[-1]))
    return (f"Reading (measured in this run): speedup over unpatched from {what}={xs[0]} to {what}={xs[-1]}: "
            f"{parts}; fastest at {what}={xs[-1]}: {fastest} ({at(fastest, xs[-1]):.2f}x).")


# --- ATC clustering against the authors' path (bench_clustering) ---------------------------------


def clustering_rows(tokens, batch: int, keep: float, linkages, dim: int, repeats: int, device) -> list[dict]:
    """``bench_clustering.run_case`` for every N and linkage: one row per sdmerge clustering path
    (``bench_clustering.PATHS``), each timed next to the authors' path, partitions checked against scipy."""
    return [
        row
        for linkage in linkages
        for n in tokens
        for row in bench_clustering.run_case(n, batch, keep, linkage, dim, repeats, device, bench_clustering.PATHS)
    ]


def clustering_reading(rows) -> str:
    largest = max(row["N"] for row in rows)
    at_largest = ", ".join(f"{r['linkage']} ({r['path']} path) {r['speedup']:.2f}x" for r in rows if r["N"] == largest)
    equal = sum(row["same_as_scipy"] for row in rows)
    return (f"Reading (measured in this run): at N={largest} sdmerge runs at {at_largest} the speed of the authors' "
            f"path (> 1: faster); {equal} of {len(rows)} partitions equal scipy's.")


def plot_clustering(rows):
    figure, axis = plt.subplots(figsize=(6.4, 4))
    for linkage in dict.fromkeys(row["linkage"] for row in rows):
        chosen = [row for row in rows if row["linkage"] == linkage]
        color = None
        for path in dict.fromkeys(row["path"] for row in chosen):
            on_path = [row for row in chosen if row["path"] == path]
            line = axis.plot([r["N"] for r in on_path], [r["sdmerge_ms"] for r in on_path], color=color,
                             marker="o" if color is None else "s", label=f"sdmerge {linkage}, {path} path")
            color = line[0].get_color()
        authors = sorted({(r["N"], r["authors_ms"]) for r in chosen if r["path"] == chosen[0]["path"]})
        axis.plot(*zip(*authors), marker="x", linestyle="--", color=color, label=f"authors (scipy) {linkage}")
    axis.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="ms per call (batch of samples)",
             title="Exact ATC clustering: sdmerge vs the authors' path")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    return figure


# --- ViT / DeiT throughput (bench_vit) ------------------------------------------------------------


def vit_rows(model_name: str, methods, settings, batch_size: int, repetitions: int, device) -> list[dict]:
    """Images per second of ``bench_vit.build(model_name)`` (random weights, float32) for the unpatched
    model and every method at every setting (``{"r": ...}`` or ``{"tokens_per_block": ...}``)."""
    model = bench_vit.build(model_name, "sdpa").to(device)
    variants = [Variant(None)] + [Variant(m, s) for m in methods for s in settings]
    times = bench_vit.benchmark(model, variants, batch_size, repetitions, "wall")
    rows, base = [], statistics.median(times[0])
    for variant, seconds in zip(variants, times):
        median = statistics.median(seconds)
        rows.append({
            "arm": variant.label.split(" ")[0], "r": variant.options.get("r"),
            "tokens_per_block": variant.options.get("tokens_per_block"), "images/s": batch_size / median,
            "speedup": base / median,
        })
    return rows


# --- pictures of merge groups ---------------------------------------------------------------------


def photograph(side: int) -> np.ndarray:
    """Grace Hopper (matplotlib's ``sample_data/grace_hopper.jpg``), centre-cropped to a square
    and resized to ``side`` x ``side``: ``[side, side, 3]`` uint8."""
    import matplotlib.cbook
    from PIL import Image

    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")) as image:
        width, height = image.size
        top = (height - width) // 3  # keep the face: crop more below than above
        square = image.convert("RGB").crop((0, top, width, top + width))
        return np.asarray(square.resize((side, side), Image.Resampling.BICUBIC))


def vit_groups(model, image: np.ndarray, methods, keep_rates, block: int) -> dict:
    """``{(method, r): (labels [N], grid)}``: the patch groups after ``block`` of ``model`` (stage
    protocol at keep rate ``r``) for ``image`` (a ``[224, 224, 3]`` uint8 array)."""
    pixels = torch.tensor(image).permute(2, 0, 1).float()[None] / 127.5 - 1  # ViT's [-1, 1] normalisation
    pixels = pixels.to(next(model.parameters()).device)
    grid = model.config.image_size // model.config.patch_size
    groups = {}
    for method in methods:
        for r in keep_rates:
            sdmerge.apply(model, method, r=r)
            plan = vit_provenance_after(model, pixels, block)
            groups[method, r] = token_labels(plan, protected=1)[0], (grid, grid)
    sdmerge.remove(model)
    return groups


def colour_error(image: np.ndarray, labels, grid) -> float:
    """Mean absolute difference (colours in [0, 1]) between ``image`` and its groups' mean colours."""
    return float(np.abs(paint_groups(image, labels, grid, border_color=None) - image / 255.0).mean())


def colour_reading(groups: dict, image: np.ndarray, keep_rate: float) -> str:
    """One sentence from the groups at ``keep_rate``: how far each method's group colours are from
    the photograph, next to random groups of the same sizes (lower: groups follow the colours)."""
    generator = torch.Generator().manual_seed(0)
    parts, randoms = [], []
    for (method, r), (labels, grid) in groups.items():
        if r == keep_rate:
            parts.append(f"{method} {colour_error(image, labels, grid):.3f}")
            shuffled = labels.cpu()[torch.randperm(labels.numel(), generator=generator)]
            randoms.append(colour_error(image, shuffled, grid))
    return (f"Reading (measured in this run): mean colour error of the groups at r={keep_rate} (0: every group is "
            f"one colour): {', '.join(parts)}; random groups of the same sizes: {np.mean(randoms):.3f}.")


def sd_img2img_pipeline(model_path, quick: bool, device, dtype) -> StableDiffusionImg2ImgPipeline:
    """A local pipeline (``model_path``), else random weights (no download): SD-1.5's UNet and
    VAE (``QUICK=False``; in QUICK mode at small widths), no text encoder (prompt embeddings are
    passed in), DDIM scheduler."""
    if model_path is not None:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_path, dtype=dtype, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)
    torch.manual_seed(0)
    vae_widths = (32, 32, 32, 32) if quick else (128, 256, 512, 512)
    vae = AutoencoderKL(
        block_out_channels=vae_widths, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1 if quick else 2,
        norm_num_groups=32,
    )
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=sd_unet(None, quick, device, dtype),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                steps_offset=1, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe if (device.type, dtype) == ("cpu", torch.float32) else pipe.to(device, dtype)


def prompt_embeddings(pipe, prompt: str, device, dtype) -> torch.Tensor:
    """The pipeline's own text encoding of ``prompt``, or, without a text encoder (random
    weights), a fixed random ``[1, 77, cross_attention_dim]`` tensor."""
    if pipe.text_encoder is not None:
        return pipe.encode_prompt(prompt, device, 1, False)[0]
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=generator).to(device, dtype)


def sd_groups(pipe, image: np.ndarray, methods, keep_rates, block: str, embeddings, steps: int = 10,
              strength: float = 0.1) -> dict:
    """``{(method, r): (labels [N], grid)}``: the plan ``block`` made at the first denoising step
    of an img2img pipeline call on ``image`` (``steps * strength`` steps run; no guidance)."""
    from PIL import Image

    sdmerge.remove(pipe)
    pixels = pipe.image_processor.preprocess(Image.fromarray(image)).to(pipe.device, pipe.vae.dtype)
    with torch.no_grad():  # encoded once; img2img takes 4-channel images as latents
        latents = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    groups = {}
    for method in methods:
        for r in keep_rates:
            sdmerge.apply(pipe, method, r=r, **({"use_rand": False} if method in ("tome", "cis") else {}))
            with record_plans(pipe, blocks=[block], steps=[0]) as plans:
                pipe(prompt_embeds=embeddings, image=latents, strength=strength, num_inference_steps=steps,
                     guidance_scale=1.0, output_type="latent")
            recorded = plans[0, block]
            groups[method, r] = recorded.labels[0], recorded.grid
    sdmerge.remove(pipe)
    return groups


def plot_pictures(groups: dict, image: np.ndarray, methods, keep_rates, title: str, border_color=(1.0, 1.0, 1.0)):
    """The photograph, then one row per keep rate, one column per method: ``image`` painted by
    each entry ``(labels, grid)`` of ``groups`` (``border_color=None``: no borders)."""
    figure, axes = plt.subplots(
        len(keep_rates), len(methods) + 1, figsize=(2.2 * (len(methods) + 1), 2.6 * len(keep_rates)), squeeze=False
    )
    for row, r in enumerate(keep_rates):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title("photograph", fontsize=9)
        for column, method in enumerate(methods, start=1):
            labels, grid = groups[method, r]
            axes[row, column].imshow(paint_groups(image, labels, grid, border_color=border_color))
            axes[row, column].set_title(f"{method}, r={r}", fontsize=9)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure
