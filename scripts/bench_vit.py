#!/usr/bin/env python
"""Throughput of ViT classifiers with every sdmerge method, as a ratio to the unpatched model.

    python scripts/bench_vit.py            # DeiT-S and ViT-B, all methods, 5 repetitions
    python scripts/bench_vit.py --quick    # DeiT-S, tome and cis only, 3 repetitions

Models are built from configs with random weights (no download): DeiT-S (384 dims, 6 heads)
and ViT-B (768 dims, 12 heads), 12 blocks, patch 16, 224x224 images (196 patches + class token),
``ViTForImageClassification`` with 1000 classes. Token merging does not depend on the weights'
values for its cost, except ATC, whose number of clustering rounds depends on the keys.

Settings per method: ToMe's 13 tokens per block, and the stage protocol at keep rates 0.7 and
0.5 (blocks 3, 6, 9). Repetitions are interleaved (every repetition runs every variant once, in
a rotating order) after one untimed warm-up call per variant; the table reports the median
seconds per batch and the ratio of the unpatched median to the variant's median. On a shared
machine, ``--threads 1 --clock cpu`` times the process's CPU time, which other tenants'
load disturbs far less than wall time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification

from sdmerge.methods import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, for eval/
from eval.vit_variants import Variant, print_table, timed_forward  # noqa: E402

MODELS = {
    "DeiT-S": dict(hidden_size=384, num_attention_heads=6, intermediate_size=1536),
    "ViT-B": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
SETTINGS = ({"tokens_per_block": 13}, {"r": 0.7}, {"r": 0.5})
VIT_METHODS = [name for name, method in METHODS.items() if "vit" in method.models]


def build(name: str, attn_implementation: str, num_hidden_layers: int = 12) -> ViTForImageClassification:
    torch.manual_seed(0)
    config = ViTConfig(
        **MODELS[name], num_hidden_layers=num_hidden_layers, image_size=224, patch_size=16, num_labels=1000,
        attn_implementation=attn_implementation,
    )
    return ViTForImageClassification(config).eval()


def benchmark(model, variants: list[Variant], batch_size: int, repetitions: int, clock: str) -> list[list[float]]:
    """Seconds per batch ``[variant][repetition]``, interleaved, after one warm-up call each."""
    parameter = next(model.parameters())
    pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values.to(device=parameter.device, dtype=parameter.dtype)
    times = [[] for _ in variants]
    with torch.inference_mode():
        for variant in variants:
            variant.install(model)
            model(pixel_values)
        for rep in range(repetitions):
            for i in np.roll(np.arange(len(variants)), rep):
                variants[i].install(model)
                times[i].append(timed_forward(model, pixel_values, clock)[1])
    variants[0].install(model)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="DeiT-S, tome and cis, 3 repetitions")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=VIT_METHODS, default=VIT_METHODS)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--attn-implementation", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or this process's CPU time (robust on a shared machine; use with --threads 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.methods, args.repetitions = ["DeiT-S"], ["tome", "cis"], 3

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, float32, attention {args.attn_implementation}, {args.repetitions} repetitions, "
          f"{args.clock} clock")
    for name in args.models:
        model = build(name, args.attn_implementation)
        variants = [Variant(None)] + [Variant(m, s) for m in args.methods for s in SETTINGS]
        times = benchmark(model, variants, args.batch_size, args.repetitions, args.clock)
        baseline = statistics.median(times[0])
        rows = []
        for variant, seconds in zip(variants, times):
            median = statistics.median(seconds)
            rows.append({
                "model": name, "variant": variant.label, "s/batch": f"{median:.3f}",
                "images/s": f"{args.batch_size / median:.1f}", "ratio": f"{baseline / median:.2f}",
                "min..max s": f"{min(seconds):.3f}..{max(seconds):.3f}",
            })
        print()
        print_table(rows, list(rows[0]))


if __name__ == "__main__":
    main()
