"""Generations: the model calls that belong together (plan reuse, the prompt mass of cis / crucial).

A *generation* is the run of model calls that denoise one batch of images: a pipeline call's
denoising loop, or a run of calls to a bare model. Plans reused across steps (``plan_every``) and
the prompt attention mass of the previous call (``cis``, ``crucial``) belong to one generation,
never to another: every thread has its own current generation (:class:`Generations` keeps them
in a ``threading.local``), so worker threads sharing one patched model never see each other's.

Where a generation starts:

- **marked**: every diffusers pipeline call marks it before its denoising loop and ends it after
  (:mod:`sdmerge.diffusion.pipeline_calls`), and :func:`sdmerge.new_generation` marks it for a
  bare model. A marked generation lasts until the mark ends or the next mark; the timestep rule
  below is off inside it, so one-step models and an img2img call after an interrupted generation
  are told apart.
- **by the timestep rule**, for calls outside a marked generation: a call starts a generation
  when its timestep is larger than the previous call's (the diffusion goes backwards in time).
- always: at the first call in a thread, when the shape of the model's input changes, and at
  every call of a model in training mode (``model.training``: each training step is its own
  generation, nothing is carried from one batch to the next).

The timestep rule with a timestep tensor (what pipelines pass) is a ``[]`` bool tensor on the
timestep's device, so a compiled model keeps it in its graph (:func:`uniform_mass_at_start`,
:class:`UnweightedAtStart` use it); everything else is known on the host (``True``/``False``).
"""

from __future__ import annotations

import logging
import threading

import torch
from torch import Tensor

from ..core.plan import MergePlan
from .config import MergeConfig
from .plan_reuse import PlanReuse

logger = logging.getLogger(__name__)


class Generation:
    """One generation in one thread: its plan reuse, the prompt mass of its latest call per block,
    and (with ``timestep_range``) which of its calls merged.

    ``marked``: started by a mark (the timestep rule is off inside it). ``shape``: the model
    input's shape. ``previous``: the latest call's timestep (a ``[]`` tensor or a float).
    """

    def __init__(self, config: MergeConfig, shape: torch.Size, marked: bool):
        self.plans: PlanReuse = PlanReuse(config.plan_every, config.share_plans)
        self.masses: dict[str, Tensor] = {}  # block name -> p [B, N] of the latest call (cis, crucial)
        self.shape = shape
        self.marked = marked
        self.previous: float | Tensor | None = None
        self.calls: list[tuple[float, bool]] = []  # (timestep, merged), counted with timestep_range only

    def rises(self, timestep) -> bool | Tensor:
        """The timestep rule: ``timestep`` (a tensor, whose first element counts, or a number) is
        larger than the previous call's (a ``[]`` bool tensor for tensors); ``False`` for ``None``
        (a model whose generations only its input shape and marks delimit)."""
        if timestep is None:
            return False
        current = timestep.detach().flatten()[0] if isinstance(timestep, Tensor) else float(timestep)
        previous, self.previous = self.previous, current
        return previous is not None and current > previous


class Generations:
    """The current generation of every thread, for one patched model."""

    def __init__(self, config: MergeConfig):
        self.config = config
        self._local = threading.local()  # .generation, .pending (a mark waiting for the next call)

    def __getstate__(self) -> dict:
        return {"config": self.config}  # a copy (deepcopy, pickle) of a model starts with no generation

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["config"])

    def current(self) -> Generation | None:
        """This thread's current generation (``None`` before its first call or after it ended)."""
        return getattr(self._local, "generation", None)

    def mark(self) -> None:
        """The next call of the model in this thread starts a marked generation."""
        self.end()
        self._local.pending = True

    def end(self) -> None:
        """End this thread's current generation (a pipeline's denoising loop is over): warn if
        ``timestep_range`` let none of its calls merge; the next call starts a new generation."""
        generation = getattr(self._local, "generation", None)
        if generation is not None:
            self._report(generation)
        self._local.generation = None
        self._local.pending = False

    def start_call(self, timestep, shape: torch.Size, training: bool) -> tuple[Generation, bool | Tensor]:
        """The generation of a model call in this thread, and whether the call starts it: ``True``
        or ``False``, or a ``[]`` bool tensor (the timestep rule on a tensor, see the module)."""
        local = self._local
        generation: Generation | None = getattr(local, "generation", None)
        pending = getattr(local, "pending", False)
        if pending or generation is None or generation.shape != shape or training:
            starts = True
        elif generation.marked:
            starts = False
        else:
            starts = generation.rises(timestep)
        if starts is True:
            if generation is not None:
                self._report(generation)
            generation = local.generation = Generation(self.config, shape, marked=pending)
            local.pending = False
            if not generation.marked:
                generation.rises(timestep)  # remember this call's timestep for the rule
        return generation, starts

    def _report(self, generation: Generation) -> None:
        """Warn once per generation when ``timestep_range`` was set and none of its calls merged."""
        if not generation.calls or any(merged for _, merged in generation.calls):
            return
        timesteps = [t for t, _ in generation.calls]
        logger.warning(
            "sdmerge: timestep_range=%s merged none of the %d model calls of a generation (their timesteps ran "
            "from %g to %g), so nothing was merged. timestep_range is in the scheduler's timestep units "
            "(0 .. num_train_timesteps - 1, e.g. 0 .. 999 for Stable Diffusion, 999 = pure noise), not fractions "
            "of the steps: e.g. (300, 1000) merges the first ~70%% of the steps.",
            self.config.timestep_range, len(timesteps), max(timesteps), min(timesteps),
        )


def uniform_mass_at_start(mass: Tensor, starts: bool | Tensor) -> Tensor | None:
    """``crucial``'s prompt mass: ``None`` (uniform) where a generation starts, else ``mass``;
    with a tensor rule, ones where it starts (the same scores as ``None`` gives)."""
    if isinstance(starts, Tensor):
        return torch.where(starts, torch.ones_like(mass), mass)
    return None if starts else mass


class UnweightedAtStart(MergePlan):
    """``cis``'s plan under a tensor rule ``starts``: its weighted merge is the plain mean where
    ``starts`` holds (no prompt mass at the first call of a generation: tome), bit for bit, and
    the importance-weighted mean otherwise (both are computed; ``torch.where`` picks one)."""

    def __init__(self, plan: MergePlan, starts: Tensor):
        super().__init__(plan.labels, plan.num_groups, plan.sizes, drops=plan.drops)
        self.starts = starts

    def merge(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        merged = super().merge(x, weights)
        if weights is None:
            return merged
        return torch.where(self.starts, super().merge(x, None), merged)
