"""What one model call merges with: made when the model is called, carried through its forward.

Everything that belongs to one call of a patched denoiser (a UNet or a diffusion transformer)
lives in a :class:`CallState`, never on the shared patched model, so that threads calling one
model at once cannot see each other's tokens or plans:

1. the model's forward pre-hook makes the call's state (its generation, whether it merges, the
   seeded split's key) and keeps it for the calling thread (:class:`CurrentCall`);
2. a *carrier* (the module whose attention keyword arguments reach the merged blocks: the model
   itself, or a UNet's ``Transformer2DModel``) puts it into those keyword arguments
   (``cross_attention_kwargs`` / ``joint_attention_kwargs``, key :data:`CARRIED`);
3. every block that receives them takes it out again in its forward pre-hook (so no attention
   processor ever sees it) and makes it the thread's current call; the branches of the block
   (attention, feed-forward) read it from there.

A block that gradient checkpointing re-runs in the backward pass gets the keyword arguments of
its forward, hence the same call, and finds the plan it made then (:attr:`CallState.plans`):
the recomputed forward merges exactly as the forward did.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from torch import Tensor

from ..core.plan import MergePlan
from .generation import Generation

CARRIED = "_sdmerge_call"
"""The key under which a :class:`CallState` travels in the blocks' attention keyword arguments."""

Merge = tuple[MergePlan, "Tensor | None"]
"""A block's plan and its merge weights (``None``: sizes, or the plain mean)."""


@dataclass(eq=False)
class CallState:
    """One model call.

    Attributes:
        generation: the call's generation (plan reuse, the previous call's prompt mass).
        starts_generation: ``True`` / ``False``, or a ``[]`` bool tensor (the timestep rule on a
            tensor, :mod:`sdmerge.diffusion.generation`).
        merging: whether this call merges (``timestep_range``).
        split_key: the seeded split's key of this call (``None`` without ``seed``).
        grids: ``(H, W)`` of the token grid each carrier saw, by carrier name.
        positions: what a layout's carrier keeps of the call to place merged tokens (Flux: the
            rotary ids of the prompt's and the image's tokens), or ``None``.
        metrics: the input tokens ``[B, N, C]`` of each merged block, until its plan is made.
        counts: the number ``N`` of image tokens of each merged block in this call.
        plans: each merged block's plan and weights, ``None`` where the block merges nothing.
        merged_bodies: the single-stream blocks whose whole body runs on merged tokens in this call.
    """

    generation: Generation
    starts_generation: bool | Tensor
    merging: bool
    split_key: Tensor | None = None
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)
    positions: object = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    plans: dict[str, Merge | None] = field(default_factory=dict)
    merged_bodies: set[str] = field(default_factory=set)


class CurrentCall:
    """The call each thread is running in one patched model (a ``threading.local``)."""

    def __init__(self):
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {}  # a copy (deepcopy, pickle) of a model has no call in flight

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()

    def get(self) -> CallState | None:
        return getattr(self._local, "call", None)

    def set(self, call: CallState | None) -> None:
        self._local.call = call

