"""The FID sweep of the ATC paper (Table 2) and ToMe-SD: SD-1.5 images of the 1000 ImageNet
classes for the unpatched model and every method x keep rate, their FID against ImageNet
validation images, and seconds per image. See docs/fid_sweep.md.

    python scripts/fid_sweep.py --preset smoke          # offline miniature, CPU, under a minute
    python scripts/fid_sweep.py --imagenet-val /data/imagenet/val --inception-weights pt_inception.pth
    accelerate launch scripts/fid_sweep.py --imagenet-val ...   # the same, split over all GPUs

Killed at any moment, the same command resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/

from eval.errors import UserError  # noqa: E402
from eval.generate import GenerationSettings  # noqa: E402
from eval.imagenet_classes import parse_class_selection  # noqa: E402
from eval.library_output import quiet_libraries  # noqa: E402
from eval.optional import optional_import, require  # noqa: E402

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
        steps=50,
        guidance_scale=7.5,
        resolution=512,
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
        guidance_scale=7.5,
        resolution=64,
        output="outputs/fid_smoke",
    ),
}
FULL_ONLY = ("model", "imagenet_val", "imagenet_val_labels", "inception_weights")


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
    add("--model", help=f"SD-1.5 hub id or local folder {preset_defaults('model')}")
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
        f"UNet call, as the papers) {preset_defaults('plan_every')}",
    )
    add(
        "--share-plans",
        help="comma-separated share_plans values of sdmerge.apply, true/false (false: one plan per block, as the "
        f"papers) {preset_defaults('share_plans')}",
    )
    add("--classes", help=f"class indices and inclusive ranges {preset_defaults('classes')}")
    add("--images-per-class", type=int, help=f"1..10 {preset_defaults('images_per_class')}")
    add("--steps", type=int, help=f"denoising steps {preset_defaults('steps')}")
    add("--guidance-scale", type=float, help=f"classifier-free guidance scale {preset_defaults('guidance_scale')}")
    add("--resolution", type=int, help=f"image side in pixels, a multiple of 8 {preset_defaults('resolution')}")
    add("--seed", type=int, default=0, help="base seed added to every image's seed (default 0)")
    add("--output", type=Path, help=f"output folder {preset_defaults('output')}")
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


def make_config(args: argparse.Namespace) -> sweep.SweepConfig:
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
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be at least 1")
    if args.resolution < 8 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE's factor)")
    output = Path(args.output)
    smoke = args.preset == "smoke"
    return sweep.SweepConfig(
        output=output,
        model=str(output / "smoke_model") if smoke else args.model,
        methods=methods,
        keep_rates=keep_rates,
        plan_every=plan_every,
        share_plans=share_plans,
        classes=parse_class_selection(args.classes),
        images_per_class=args.images_per_class,
        generation=GenerationSettings(args.steps, args.guidance_scale, args.resolution),
        imagenet_val=output / "smoke_reference" if smoke else args.imagenet_val,
        imagenet_val_labels=args.imagenet_val_labels,
        inception_weights=args.inception_weights,
        smoke=smoke,
        base_seed=args.seed,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require(sweep)
    quiet_libraries()
    try:
        sweep.run(make_config(args))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
