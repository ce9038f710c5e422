"""The FID sweep of the ATC paper (Table 2) and ToMe-SD: images of the 1000 ImageNet classes made
by a text-to-image model (SD-1.5 by default; SD3 / SD3.5 and PixArt too, the family detected)
for the unpatched model and every method x keep rate, their FID against ImageNet validation
images, and seconds per image. See docs/fid_sweep.md.

    python scripts/fid_sweep.py --preset smoke          # offline miniature (tiny SD and SD3), CPU, under a minute
    python scripts/fid_sweep.py --imagenet-val /data/imagenet/val --inception-weights pt_inception.pth
    python scripts/fid_sweep.py --model stabilityai/stable-diffusion-3-medium-diffusers --imagenet-val ...
    accelerate launch scripts/fid_sweep.py --imagenet-val ...   # the same, split over all GPUs

Killed at any moment, the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/

from eval.errors import UserError  # noqa: E402
from eval.families import FAMILIES  # noqa: E402
from eval.imagenet_classes import parse_class_selection  # noqa: E402
from eval.library_output import quiet_libraries  # noqa: E402
from eval.optional import optional_import, require  # noqa: E402
from eval.smoke import TINY_FAMILIES  # noqa: E402

sweep = optional_import("eval.sweep")  # needs the sweep extra (accelerate)

PRESETS = {
    "full": dict(
        model="stable-diffusion-v1-5/stable-diffusion-v1-5",
        methods="tome,atc_single,atc_average,atc_complete,cis",
        keep_rates="0.9,0.8,0.7,0.6,0.5,0.4",
        plan_every="1",
        share_plans="false",
        classes="0-999",
        images_per_class=2,
        output="outputs/fid_sweep",
    ),
    "smoke": dict(
        methods="tome,atc_average",
        keep_rates="0.5",
        plan_every="1",
        share_plans="false",
        classes="1,7,18,207,417,980",
        images_per_class=2,
        steps=3,
        output="outputs/fid_smoke",
    ),
}
FULL_ONLY = ("model", "imagenet_val", "imagenet_val_labels", "inception_weights")


def family_defaults(name: str) -> str:
    """``"sd 50, sd3 28, ..."``: every family's default of a generation setting, for a flag's help."""
    return ", ".join(f"{family.name} {getattr(family, name):g}" for family in FAMILIES)


def preset_defaults(name: str) -> str:
    """``"(full: X; smoke: Y)"`` for a flag's help."""
    return "(" + "; ".join(f"{preset}: {values[name]}" for preset, values in PRESETS.items() if name in values) + ")"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Protocol, output files and caveats: docs/fid_sweep.md"
    )
    add = parser.add_argument
    add(
        "--preset",
        choices=list(PRESETS),
        default="full",
        help="full: the real protocol (default); smoke: offline miniature on CPU",
    )
    add(
        "--model",
        help="hub id or local diffusers folder of a StableDiffusionPipeline, StableDiffusion3Pipeline, "
        f"PixArtSigmaPipeline or PixArtAlphaPipeline (the family is read from its model_index.json) "
        f"{preset_defaults('model')}; smoke: tiny {' and '.join(TINY_FAMILIES)} models, built on the spot",
    )
    add(
        "--imagenet-val",
        type=Path,
        help="ImageNet-1k validation folder: class folders n0.../, or flat files with --imagenet-val-labels",
    )
    add("--imagenet-val-labels", type=Path, help="label file (wnids) for a flat validation folder")
    add(
        "--inception-weights",
        type=Path,
        help="local Inception weights (torch-fidelity's pt_inception-2015-12-05-6726825d.pth)",
    )
    add(
        "--methods",
        help=f"comma-separated methods, or 'none' for the unpatched model only {preset_defaults('methods')}",
    )
    add("--keep-rates", help=f"comma-separated keep rates in (0, 1] {preset_defaults('keep_rates')}")
    add(
        "--plan-every",
        help="comma-separated plan_every values of sdmerge.apply, whole numbers >= 1 (1: new plans at every "
        f"call of the UNet or transformer, as the papers) {preset_defaults('plan_every')}",
    )
    add(
        "--share-plans",
        help="comma-separated share_plans values of sdmerge.apply, true/false (false: one plan per block, as the "
        f"papers) {preset_defaults('share_plans')}",
    )
    add("--classes", help=f"class indices and inclusive ranges {preset_defaults('classes')}")
    add("--images-per-class", type=int, help=f"1..10 {preset_defaults('images_per_class')}")
    add(
        "--steps",
        type=int,
        help=f"denoising steps (full: the family's, {family_defaults('steps')}; smoke: {PRESETS['smoke']['steps']})",
    )
    add(
        "--guidance-scale",
        type=float,
        help=f"classifier-free guidance scale (the family's: {family_defaults('guidance_scale')})",
    )
    add(
        "--resolution",
        type=int,
        help="square image side in pixels, a multiple of the VAE factor (times the patch size of a transformer) "
        "(the model's native size: SD-1.5 512, SD3 and PixArt 1024; smoke: its tiny models' 64)",
    )
    add("--seed", type=int, default=0, help="base seed added to every image's seed (default 0)")
    add(
        "--output",
        type=Path,
        help=f"output folder; each model's sweep goes to its subfolder OUTPUT/FAMILY {preset_defaults('output')}",
    )
    args = parser.parse_args(argv)
    if args.preset == "smoke":
        given = [f"--{name.replace('_', '-')}" for name in FULL_ONLY if getattr(args, name) is not None]
        if given:
            parser.error(
                f"{', '.join(given)}: not with --preset smoke, which builds its own model, reference and extractor"
            )
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def make_configs(args: argparse.Namespace) -> list[sweep.SweepConfig]:
    """One sweep per model: ``--model`` (full), or every tiny model of the smoke preset."""
    methods = [] if args.methods.strip() == "none" else [m.strip() for m in args.methods.split(",")]
    try:
        keep_rates = [float(r) for r in args.keep_rates.split(",")]
    except ValueError:
        raise UserError(
            f"--keep-rates {args.keep_rates!r}: expected comma-separated numbers in (0, 1], e.g. 0.9,0.5"
        ) from None
    try:
        plan_every = [int(k) for k in args.plan_every.split(",")]
    except ValueError:
        raise UserError(
            f"--plan-every {args.plan_every!r}: expected comma-separated whole numbers >= 1, e.g. 1,5"
        ) from None
    booleans = {"true": True, "false": False}
    share_plans = [booleans.get(value.strip().lower()) for value in args.share_plans.split(",")]
    if None in share_plans:
        raise UserError(f"--share-plans {args.share_plans!r}: expected comma-separated true/false, e.g. false,true")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    if args.resolution is not None and args.resolution < 1:
        raise UserError(f"--resolution {args.resolution}: must be a positive number of pixels")
    output = Path(args.output)
    common = dict(
        output=output,
        methods=methods,
        keep_rates=keep_rates,
        plan_every=plan_every,
        share_plans=share_plans,
        classes=parse_class_selection(args.classes),
        images_per_class=args.images_per_class,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        base_seed=args.seed,
    )
    if args.preset == "smoke":
        return [
            sweep.SweepConfig(
                model=str(output / family / "smoke_model"),
                tiny_model=family,
                imagenet_val=output / "smoke_reference",
                **common,
            )
            for family in TINY_FAMILIES
        ]
    return [
        sweep.SweepConfig(
            model=args.model,
            imagenet_val=args.imagenet_val,
            imagenet_val_labels=args.imagenet_val_labels,
            inception_weights=args.inception_weights,
            **common,
        )
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require(sweep)
    quiet_libraries()
    try:
        for number, config in enumerate(make_configs(args)):
            if number:
                print()
            sweep.run(config)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
