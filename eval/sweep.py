"""The FID sweep of one model: generate every arm's images (split over processes, resumable),
then FID and timings per arm, then the result files. ``scripts/fid_sweep.py`` is its command
line (the smoke preset runs it once per tiny model).

Stages, all in :func:`run`:

1. checks before any image is made: the arms and classes, the reference folder (selection
   only), the feature extractor (built by the main process), the model's family (from its
   ``model_index.json``, ``eval/families.py``), the model (loaded by every process), the
   generation settings (the family's defaults where none are given), and that the sweep's
   folder ``--output/{family}`` does not hold images made with other settings
   (``run_settings.json``);
2. generation: each process makes its round-robin share (``eval/worklist.py``), skipping
   finished images (``eval/generate.py``); a progress bar on the main process;
3. the main process waits for all, then computes the reference statistics (cached), every
   arm's FID and seconds per image from the files on disk, and writes ``results.csv``,
   ``results.md``, the plot and the image grid (``eval/report.py``).

Since stage 3 reads only files, a resumed run's results equal an uninterrupted run's (the
measured seconds per image aside).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from . import report
from .atomic import is_temporary, write_json
from .environment import device_name, library_versions
from .errors import OFFLINE_HINT, UserError
from .fid import FeatureExtractor, frechet_distance, image_statistics
from .families import Family, detect_family
from .generate import TIMING, GenerationSettings, ImageMaker, generate, image_path, read_timing
from .imagenet_classes import PROMPT_TEMPLATE, imagenet_classes
from .inception import inception_extractor
from .reference import PER_CLASS, reference_provenance, reference_statistics, select_reference
from .seeds import FORMULA as SEED_FORMULA
from .smoke import build_reference_images, build_tiny_pipeline, random_features
from .worklist import Arm, WorkItem, make_arms, make_work_list, process_share

SMOKE_WARNING = (
    "SMOKE PRESET: a tiny random-weight pipeline and a random feature network instead of a real model and "
    "Inception. These numbers only check that the machinery runs; they say nothing about image "
    "quality or speed."
)
GRID_CLASSES = (18, 207, 417, 980)  # magpie (the ATC paper's Figure 6), golden retriever, balloon, volcano
BARRIER_TIMEOUT = timedelta(hours=6)  # how long processes wait for each other (multi-process runs)


@dataclass
class SweepConfig:
    """Everything a sweep depends on (``scripts/fid_sweep.py`` fills it from a preset and flags)."""

    output: Path  # the sweep's files go to output / the model's family name
    model: str  # hub id or local folder; for the smoke preset, where its tiny model is built
    methods: list[str]
    keep_rates: list[float]
    classes: list[int]
    images_per_class: int
    steps: int | None = None  # None: the family's default (eval/families.py)
    guidance_scale: float | None = None  # None: the family's default
    resolution: int | None = None  # None: the model's native size
    imagenet_val: Path | None = None
    imagenet_val_labels: Path | None = None
    inception_weights: Path | None = None
    tiny_model: str | None = None  # smoke preset: the family of the tiny model built at ``model`` (eval/smoke.py)
    base_seed: int = 0
    reference_per_class: int = PER_CLASS
    plan_every: list[int] = field(default_factory=lambda: [1])  # sdmerge's plan reuse, one arm per value
    share_plans: list[bool] = field(default_factory=lambda: [False])

    @property
    def smoke(self) -> bool:
        """The offline miniature: a tiny model, made-up reference images, a random feature network."""
        return self.tiny_model is not None


def run(config: SweepConfig, log: Callable[[str], None] = print) -> list[report.ArmResult] | None:
    """Run the sweep; returns the results on the main process, None on the others.

    The smoke preset runs on one CPU thread: its tiny models are fastest there, and two threads
    can stall for seconds per call on a busy 2-core machine.
    """
    if not config.smoke:
        return _run(config, log)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(config, log)
    finally:
        torch.set_num_threads(threads)


def _run(config: SweepConfig, log: Callable[[str], None]) -> list[report.ArmResult] | None:
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    dtype = torch.float16 if state.device.type == "cuda" else torch.float32
    arms = make_arms(config.methods, config.keep_rates, config.plan_every, config.share_plans)
    items = make_work_list(arms, config.classes, config.images_per_class, config.base_seed)
    if config.smoke:
        log(SMOKE_WARNING)
        with state.main_process_first():
            build_tiny_pipeline(Path(config.model), config.tiny_model)
            wnids = [imagenet_classes()[c].wnid for c in config.classes]
            build_reference_images(config.imagenet_val, wnids, config.reference_per_class)
    reference_files = _select_reference(config)
    extractor = None
    if state.is_main_process:  # built now, so that a missing file or download stops the run before generating
        extractor = random_features() if config.smoke else inception_extractor(config.inception_weights)
    family = detect_family(config.model)
    folder = config.output / family.name
    pipe = family.load(config.model, state.device, dtype)
    generation = family.settings(pipe, config.steps, config.guidance_scale, config.resolution)
    settings = _run_settings(config, family, generation, dtype)
    _check_run_settings(folder / "run_settings.json", settings)
    pipeline = family.as_loaded(pipe)
    subject = f"{family.name}, {family.pipeline} from {config.model}"
    log(
        f"{subject}: {generation.resolution}x{generation.resolution} pixels, {generation.steps} steps, "
        f"guidance {generation.guidance_scale} -> {folder}"
    )

    state.wait_for_everyone()
    if state.is_main_process:  # the settings are recorded once a model with them has loaded
        write_json(folder / "run_settings.json", settings)
        for leftover in (folder / "images").glob("*/*"):
            if is_temporary(leftover):  # a write that a kill interrupted
                leftover.unlink()
    state.wait_for_everyone()
    _generate_share(folder / "images", generation, state, items, pipe, log)
    del pipe
    if state.device.type == "cuda":
        torch.cuda.empty_cache()
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    results, reference = _evaluate(config, folder, arms, items, reference_files, extractor, state.device, log)
    provenance = {
        "preset": "smoke (numbers only check the machinery)" if config.smoke else "full",
        **settings,
        **pipeline,
        **_protocol(config, reference, extractor),
        "num_processes": state.num_processes,
        "main_device": device_name(state.device),
        "versions": library_versions(),
    }
    _write_results(config, folder, subject, generation.resolution, results, items, provenance, log)
    return results


def _protocol(config: SweepConfig, reference: dict, extractor: FeatureExtractor) -> dict:
    """What was swept and how it was measured, for the result files."""
    return {
        "classes": len(config.classes),
        "images_per_class": config.images_per_class,
        "seed": f"{SEED_FORMULA} (base_seed {config.base_seed}; CPU torch.Generator)",
        "reference": ("made-up images standing in for " if config.smoke else "") + reference["definition"],
        "reference_root": str(config.imagenet_val),
        "reference_images": reference["count"],
        "feature_extractor": extractor.identity,
        "fid_computation": "eval/fid.py: Fréchet distance in float64 between Gaussians of the extractor's features",
        "timing": TIMING,
    }


def _generate_share(
    images_dir: Path,
    generation: GenerationSettings,
    state: PartialState,
    items: list[WorkItem],
    pipe,
    log: Callable[[str], None],
) -> None:
    """Make this process's share of the images that do not exist yet (progress bar on the main process)."""
    share = process_share(items, state.process_index, state.num_processes)
    done = sum(image_path(images_dir, item).exists() for item in share)
    log(
        f"{len(items)} images in {len({item.arm for item in items})} arms; process "
        f"{state.process_index + 1}/{state.num_processes} makes {len(share)}, {done} already done"
    )
    origin = {"device": device_name(state.device), "process": f"{state.process_index}/{state.num_processes}"}
    with tqdm(
        total=len(share), initial=done, unit="image", desc="generating", disable=not state.is_main_process
    ) as bar:
        generate(share, images_dir, ImageMaker(pipe, generation, state.device), origin, bar.update)


def _select_reference(config: SweepConfig) -> list[Path]:
    if config.imagenet_val is None:
        raise UserError(
            "--imagenet-val is required: the ImageNet-1k validation images for the FID reference, " + OFFLINE_HINT
        )
    wnids = [c.wnid for c in imagenet_classes()]
    if config.smoke:
        wnids = [wnids[c] for c in config.classes]
    return select_reference(config.imagenet_val, wnids, config.reference_per_class, config.imagenet_val_labels)


def _run_settings(config: SweepConfig, family: Family, generation: GenerationSettings, dtype: torch.dtype) -> dict:
    """The settings every image of a sweep's folder must share (arms and classes may change between runs)."""
    return {
        "model": config.model,
        "family": family.name,
        "pipeline": family.pipeline,
        "steps": generation.steps,
        "guidance_scale": generation.guidance_scale,
        "resolution": generation.resolution,
        "pipeline_call_options": dict(generation.call_options),
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_template": PROMPT_TEMPLATE,
        "base_seed": config.base_seed,
    }


def _check_run_settings(path: Path, settings: dict) -> None:
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    changed = [
        f"{key}: {before.get(key)!r} there, {value!r} now"
        for key, value in settings.items()
        if before.get(key) != value
    ]
    if changed:
        raise UserError(
            f"{path.parent} holds images made with other settings ({'; '.join(changed)}). "
            f"Use another --output, or delete that folder to start over."
        )


def _evaluate(
    config: SweepConfig,
    folder: Path,
    arms: list[Arm],
    items: list[WorkItem],
    reference_files: list[Path],
    extractor: FeatureExtractor,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[list[report.ArmResult], dict]:
    """FID and timing of every arm, from the files on disk; returns ``(results, reference provenance)``."""
    images_dir = folder / "images"
    missing = [item for item in items if not image_path(images_dir, item).exists()]
    if missing:
        raise UserError(
            f"{len(missing)} images are missing, e.g. {image_path(images_dir, missing[0])} (did a process "
            f"stop early?). Rerun the same command to make them."
        )
    provenance = reference_provenance(reference_files, config.imagenet_val, config.reference_per_class, extractor)
    with tqdm(total=len(reference_files) + len(items), unit="image", desc="FID features") as bar:
        reference, reused = reference_statistics(
            reference_files, provenance, extractor, folder / "reference_stats.npz", device, bar.update
        )
        if reused:
            bar.update(len(reference_files))
        by_arm: dict[Arm, list[WorkItem]] = {arm: [] for arm in arms}
        for item in items:
            by_arm[item.arm].append(item)
        results = []
        for arm, arm_items in by_arm.items():
            stats = image_statistics(
                [image_path(images_dir, i) for i in arm_items], extractor, device, on_batch=bar.update
            )
            timings = [t for i in arm_items if (t := read_timing(images_dir, i)) is not None]
            seconds = [t["seconds"] for t in timings]
            results.append(
                report.ArmResult(
                    arm=arm,
                    fid=frechet_distance(stats, reference),
                    images=stats.count,
                    seconds_per_image=statistics.mean(seconds) if seconds else None,
                    seconds_per_image_std=statistics.stdev(seconds) if len(seconds) > 1 else None,
                    timed_images=len(seconds),
                    devices="; ".join(sorted({t["device"] for t in timings})),
                )
            )
    cache = "reused from the cache" if reused else "computed and cached"
    log(f"reference statistics ({len(reference_files)} images): {cache}")
    return results, provenance


def _write_results(
    config: SweepConfig,
    out: Path,
    subject: str,
    resolution: int,
    results: list[report.ArmResult],
    items: list[WorkItem],
    provenance: dict,
    log: Callable[[str], None],
) -> None:
    notes = [SMOKE_WARNING] if config.smoke else []
    banner = report.SMOKE_BANNER if config.smoke else None
    grid_classes = [c for c in GRID_CLASSES if c in config.classes] or config.classes[:4]
    first_images = {(i.arm, i.class_index): image_path(out / "images", i) for i in items if i.image_index == 0}
    rows = [(r.arm.name, [first_images[r.arm, c] for c in grid_classes]) for r in results]
    names = imagenet_classes()
    report.write_image_grid(
        out / report.GRID_FILE,
        rows,
        [names[c].name.split(",")[0] for c in grid_classes],
        tile=min(resolution, 192),
        banner=banner,
    )
    if report.write_plot(out / report.PLOT_FILE, results, banner):
        plot_line = f"plot: {out / report.PLOT_FILE}"
    else:
        plot_line = 'plot skipped: matplotlib is not installed (pip install -e ".[plots]")'
        notes = notes + [plot_line]
    report.write_csv(out / "results.csv", results, provenance)
    report.write_markdown(out / "results.md", results, provenance, notes, banner, subject)
    log("")
    log((out / "results.md").read_text().split("## Provenance")[0].rstrip())
    log("")
    log(f"results: {out / 'results.csv'}, {out / 'results.md'}; image grid: {out / report.GRID_FILE}; {plot_line}")
    if config.smoke:
        log(SMOKE_WARNING)
