"""What ``scripts/eval_vit.py`` and ``scripts/bench_vit.py`` share: the compared variants of one
model and how a forward call is timed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

import sdmerge


@dataclass(frozen=True)
class Variant:
    """The unpatched model (``method=None``) or ``sdmerge.apply(model, method, **options)``."""

    method: str | None
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.method is None:
            return "unpatched"
        settings = " ".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method} {settings}".strip()

    def install(self, model) -> None:
        """Put ``model`` into this variant (cheap: it patches forwards, weights are untouched)."""
        if self.method is None:
            sdmerge.remove(model)
        else:
            sdmerge.apply(model, self.method, **self.options)


def add_schedule_arguments(parser) -> None:
    """The schedule options of ``sdmerge.apply`` for ViT/DeiT, as command-line flags."""
    parser.add_argument("--r", type=float, help="keep rate at each stage (stage protocol)")
    parser.add_argument("--stages", type=int, nargs="+", help="0-based reducing blocks (default: 3 6 9 of 12)")
    parser.add_argument("--tokens-per-block", type=int, help="tokens removed in every block (per-block protocol)")
    parser.add_argument("--schedule", choices=["constant", "linear"], help="per-block schedule (with --tokens-per-block)")
    parser.add_argument("--no-prop-attn", action="store_true", help="switch proportional attention off")


def schedule_options(args) -> dict:
    """The ``sdmerge.apply`` options given on the command line (unset ones are left out)."""
    options = {"r": args.r, "stages": args.stages, "tokens_per_block": args.tokens_per_block, "schedule": args.schedule}
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options.items() if v is not None}
    if args.no_prop_attn:
        options["prop_attn"] = False
    return options


def timed_forward(model, pixel_values: torch.Tensor, clock: str = "wall"):
    """``(output, seconds)`` of one ``model(pixel_values)`` call.

    ``clock="wall"``: elapsed time, the device synchronised around the call. ``clock="cpu"``:
    CPU time of this process (CPU only), which other processes on a shared machine disturb far
    less than wall time.
    """
    if clock == "cpu" and pixel_values.is_cuda:
        raise ValueError("clock='cpu' measures CPU time; it cannot time a CUDA forward")
    now = time.process_time if clock == "cpu" else time.perf_counter
    synchronize = torch.cuda.synchronize if pixel_values.is_cuda else (lambda: None)
    synchronize()
    start = now()
    output = model(pixel_values)
    synchronize()
    return output, now() - start


def logits_of(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A plain-text table of ``rows`` (dicts) in ``columns`` order."""
    cells = [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
