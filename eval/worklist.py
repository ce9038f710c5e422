"""What the sweep produces: its arms, one work item per image, and each process's share.

An *arm* is the unpatched model (``baseline``) or one method at one keep rate (``tome_r0.5``),
optionally with plan reuse (``tome_r0.5_shared_every5``: ``share_plans=True, plan_every=5``;
without reuse the name has no suffix, so image folders of sweeps from before these options
are the arms without reuse).
The global work list is arm-major (every image of the first arm, then the next arm, ...), then
class, then image index; it is a pure function of the arms, the classes and the images per class,
so every process of a multi-process run builds the same list. Process ``p`` of ``k`` takes the
items ``p, p + k, p + 2k, ...`` (round-robin): every image is made by exactly one process, and
each process works through the arms in the same order with an equal share of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sdmerge.core import check_keep_rate
from sdmerge.methods import get_method

from .errors import UserError
from .imagenet_classes import imagenet_classes
from .seeds import MAX_IMAGES_PER_CLASS, image_seed

BASELINE = "baseline"


@dataclass(frozen=True)
class Arm:
    """The unpatched model (``method=None``, keep rate 1) or ``method`` at ``keep_rate`` with the
    plan-reuse options ``plan_every`` and ``share_plans`` of ``sdmerge.apply`` (defaults: no reuse)."""

    method: str | None
    keep_rate: float = 1.0
    plan_every: int = 1
    share_plans: bool = False

    @property
    def reuse(self) -> str:
        """The reuse suffix: ``""`` (none), ``"_shared"``, ``"_every5"``, ``"_shared_every5"``."""
        return ("_shared" if self.share_plans else "") + (f"_every{self.plan_every}" if self.plan_every != 1 else "")

    @property
    def name(self) -> str:
        """Folder name: ``baseline`` or ``{method}_r{keep_rate:g}{reuse}``, e.g. ``tome_r0.5``,
        ``atc_average_r0.4_shared_every5``."""
        return BASELINE if self.method is None else f"{self.method}_r{self.keep_rate:g}{self.reuse}"

    @property
    def row(self) -> str:
        """Table row and plot line: the method and its reuse, e.g. ``tome``, ``atc_average_shared_every5``."""
        return BASELINE if self.method is None else f"{self.method}{self.reuse}"


@dataclass(frozen=True)
class WorkItem:
    """One image to generate."""

    arm: Arm
    class_index: int
    image_index: int
    seed: int
    prompt: str

    @property
    def stem(self) -> str:
        """File name without suffix inside the arm's folder: ``{class_index:04d}_{image_index}``."""
        return f"{self.class_index:04d}_{self.image_index}"


def make_arms(
    methods: Sequence[str],
    keep_rates: Sequence[float],
    plan_every: Sequence[int] = (1,),
    share_plans: Sequence[bool] = (False,),
) -> list[Arm]:
    """The baseline, then for every method, every reuse setting (``share_plans`` within
    ``plan_every``), every keep rate (in the given orders).

    Raises :class:`UserError` for an unknown method, a keep rate outside ``0 < r <= 1``, a
    ``plan_every`` that is not an int >= 1, a ``share_plans`` that is not a bool, or a repeated value.
    """
    axes = (("--methods", methods), ("--keep-rates", keep_rates), ("--plan-every", plan_every))
    for name, values in axes + (("--share-plans", share_plans),):
        if len(set(values)) != len(values):
            raise UserError(f"{name}: {', '.join(map(str, values))} repeats a value")
    for k in plan_every:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"--plan-every: {k!r} is not allowed; use whole numbers >= 1 (1: no reuse)")
    for shared in share_plans:
        if not isinstance(shared, bool):
            raise UserError(f"--share-plans: {shared!r} is not allowed; use true or false")
    try:
        for method in methods:
            get_method(method, "sd")
        rates = [check_keep_rate(r) for r in keep_rates]
    except ValueError as error:
        raise UserError(str(error)) from None
    reuse = [(k, shared) for k in plan_every for shared in share_plans]
    return [Arm(None)] + [Arm(method, rate, k, shared) for method in methods for k, shared in reuse for rate in rates]


def make_work_list(
    arms: Sequence[Arm], class_indices: Sequence[int], images_per_class: int, base_seed: int = 0
) -> list[WorkItem]:
    """Every image of the sweep: arm-major, then class, then image index (see the module docstring)."""
    if not 1 <= images_per_class <= MAX_IMAGES_PER_CLASS:
        raise UserError(
            f"--images-per-class {images_per_class} is not allowed: use 1..{MAX_IMAGES_PER_CLASS} "
            f"(the seed formula in eval/seeds.py gives distinct seeds up to {MAX_IMAGES_PER_CLASS})"
        )
    classes = imagenet_classes()
    return [
        WorkItem(arm, c, i, image_seed(c, i, base_seed), classes[c].prompt)
        for arm in arms
        for c in class_indices
        for i in range(images_per_class)
    ]


def process_share(items: Sequence[WorkItem], process_index: int, num_processes: int) -> list[WorkItem]:
    """Process ``process_index``'s round-robin share of ``items`` (``0 <= process_index < num_processes``)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process index {process_index} is outside 0..{num_processes - 1}")
    return list(items[process_index::num_processes])
