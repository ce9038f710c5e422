"""Recording the merge plans a model makes, to look at them (e.g. with :mod:`sdmerge.visualize`).

Stable Diffusion: the plans of chosen blocks at chosen steps of a real pipeline call::

    sdmerge.apply(pipe, "atc_average", r=0.5)
    with sdmerge.plan_recording.record_plans(pipe, blocks=["down_blocks.0.attentions.0.transformer_blocks.0"],
                                             steps=[0, 10]) as plans:
        pipe(prompt, num_inference_steps=20)
    plan = plans[0, "down_blocks.0.attentions.0.transformer_blocks.0"]   # a RecordedPlan
    picture = sdmerge.visualize.paint_groups(image, plan.labels[1], plan.grid)

Nothing is recorded outside the ``with`` block, and a patched UNet that is not recording pays
one ``is None`` test per plan.

ViT / DeiT (transformers): the provenance plan after a chosen block, :func:`vit_provenance_after`.

The diffusion integration (and so diffusers) is imported by :func:`record_plans` only: the
ViT function works where diffusers is not installed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .core.plan import MergePlan
from .vit import blocks, reduction_state

if TYPE_CHECKING:
    from .diffusion import MergedBlock


@dataclass(frozen=True)
class RecordedPlan:
    """The plan one merged Stable Diffusion block made at one step.

    Attributes:
        step: the UNet call it was made in, counted from 0 since recording started (one
            pipeline call: the denoising step; classifier-free guidance runs both halves in one call).
        block: the transformer block's name (see :func:`sdmerge.diffusion.merged_blocks`).
        labels: ``[B, N]`` int64, the group of each of the block's ``N`` tokens (on the model's
            device, not copied). In a pipeline with classifier-free guidance, sample ``b`` of
            the unconditional half is ``b``, of the conditional half ``B/2 + b``.
        num_groups: ``M``, the number of groups.
        grid: ``(H, W)``, the block's token grid (row-major, ``H * W = N``).
    """

    step: int
    block: str
    labels: Tensor
    num_groups: int
    grid: tuple[int, int]


def _checked_steps(steps) -> frozenset[int] | None:
    if steps is None:
        return None
    if isinstance(steps, int):
        steps = [steps]
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
    if bad:
        raise ValueError(f"steps must be ints >= 0 (UNet calls counted from 0), got {bad!r}")
    return frozenset(steps)


@contextlib.contextmanager
def record_plans(model, blocks=None, steps=None):
    """Record the plans of ``blocks`` at ``steps`` while the ``with`` block runs.

    Args:
        model: a pipeline or UNet patched by ``sdmerge.apply`` (apply first).
        blocks: names of merged transformer blocks (``sdmerge.diffusion.merged_blocks(model)``),
            or ``None`` for all of them.
        steps: UNet calls to record, counted from 0 when the ``with`` block starts (an int, an
            iterable of ints, or ``None`` for every call).

    Yields a dict ``{(step, block): RecordedPlan}`` filled as the model runs. A block with
    nothing to remove (``r = 1``) makes no plan and records nothing. Raises ``ValueError`` for
    an unpatched model, an unknown block name or an invalid step.
    """
    from .diffusion.patch import find_denoiser, state_of

    state = state_of(model)
    if state is None:
        raise ValueError("the model is not patched by sdmerge: call sdmerge.apply(model, ...) before record_plans")
    chosen = state.names if blocks is None else ((blocks,) if isinstance(blocks, str) else tuple(blocks))
    unknown = [name for name in chosen if name not in state.names]
    if unknown:
        raise ValueError(f"blocks {unknown} are not merged; the merged blocks are {list(state.names)}")
    wanted_steps = _checked_steps(steps)
    plans: dict[tuple[int, str], RecordedPlan] = {}
    call = [-1]

    def count_call(module, args, kwargs) -> None:
        call[0] += 1

    def observe(block: MergedBlock, plan: MergePlan, grid: tuple[int, int]) -> None:
        if wanted_steps is None or call[0] in wanted_steps:
            plans[call[0], block.name] = RecordedPlan(call[0], block.name, plan.labels, plan.num_groups, grid)

    observed = [block for block in state.blocks if block.name in chosen]
    if any(block.observer is not None for block in observed):
        raise ValueError("record_plans is already recording these blocks (nested record_plans on the same blocks)")
    hooks = [find_denoiser(model).register_forward_pre_hook(count_call, with_kwargs=True)]
    for block in observed:
        block.observer = observe
    try:
        yield plans
    finally:
        for hook in hooks:
            hook.remove()
        for block in observed:
            block.observer = None


def vit_provenance_after(model, pixel_values: Tensor, block: int) -> MergePlan | None:
    """Run a patched ViT/DeiT (transformers, or timm ``VisionTransformer``) on ``pixel_values``
    ``[B, 3, H, W]`` and return the provenance plan after block ``block`` (0-based): ``labels
    [B, N_0]`` maps the ``N_0`` input tokens (protected prefix first) to the tokens leaving that
    block. ``None``: no block up to ``block`` reduced. Use :func:`sdmerge.visualize.token_labels`
    to drop the protected tokens.
    """
    reduction_state(model)  # a TypeError for a model that is no ViT, a ValueError for an unpatched one
    layers = blocks(model)  # transformers (either layer layout) or timm
    if isinstance(block, bool) or not isinstance(block, int) or not 0 <= block < len(layers):
        raise ValueError(f"block={block!r} must be an int in [0, {len(layers)}) for this {len(layers)}-block model")
    captured = []
    hook = layers[block].register_forward_hook(lambda module, args, out: captured.append(reduction_state(model).provenance))
    try:
        with torch.no_grad():
            model(pixel_values)
    finally:
        hook.remove()
    return captured[0]

